"""Evaluate a converted VideoMAE-2 checkpoint on Kinetics-400, with or without RLT.

    python -m rlt_jax.convert --input vit_b_k400_ft.pth --output models/vit_b_k400
    python -m rlt_jax.main --config=configs/k400_eval.py --workdir=/tmp/eval_b \
        --config.init_from=models/vit_b_k400 --config.data.test='/data/k400/val.tfrecord-*'
    # the same without RLT:  --config.rlt.policy=none

Release protocol: 4 clips × 3 crops per video (16 frames at stride 4, short side 224, crops at
the start, centre and end of the long side), softmax averaged over the 12 views. With RLT each
batch runs at the smallest 128-token capacity that holds its clips, so every clip's logits are
those of its kept tokens alone. Writes test_0.json (top-1/top-5, tokens kept, clips/s) and
test_0_per_class.csv to the workdir.
Expected (the paper): ViT-B 80.9%, ViT-L 84.7%, ViT-H 86.2% top-1, the same with RLT, with
about a third fewer tokens. Not yet reproduced here (no Kinetics copy on the project's machines).
Cost: 20k videos × 12 views; on one H100 in bf16 roughly tens of minutes for ViT-B (estimate).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("B/16", "k400", rlt=True)
  c.mode = "eval"
  c.data.train = ""
  c.data.val = ""
  c.eval_batch_size = 96
  return c
