"""Evaluate a converted VideoMAE-2 checkpoint (release protocol, 4 × 3 views), training-free.

    python -m rlt_jax.convert --input vit_b_k400_ft.pth --output models/vit_b_k400
    python -m rlt_jax.main --config=configs/eval.py --workdir=/tmp/eval_b \
        --config.init_from=models/vit_b_k400 --config.data.final='/data/k400/val.tfrecord-*'
    # other token policies:  --config=configs/eval.py:policy=none | policy=random
    #   ToMe alone (r tokens merged per block): --config=configs/eval.py:policy=none,tome=8
    #   RLT then ToMe:                          --config=configs/eval.py:tome=8

4 clips × 3 crops per video (16 frames at stride 4, short side 224, crops at the start, centre
and end of the long side), softmax averaged over the 12 views; each clip's logits are those of
its kept tokens alone. Writes final_4x3_step0.json (top-1/top-5, tokens kept, clips/s) and its
per-class CSV to the workdir.
Expected (the paper): ViT-B 80.9%, ViT-L 84.7%, ViT-H 86.2% top-1, the same with RLT, with
about a third fewer tokens. Not reproduced here (no Kinetics copy on the project's machines).
Cost: 20k videos × 12 views; on one H100 in bf16 roughly tens of minutes for ViT-B (estimate).
"""

from rlt_jax.training import recipes


def get_config(arg=None):
  a = recipes.parse_arg(arg, dataset="k400", policy="rlt", tome=0)
  c = recipes.base("B/16", a.dataset, rlt=True)
  c.mode = "eval"
  c.rlt.policy = a.policy
  c.tome.r = a.tome
  c.data.train = ""
  c.data.val = ""
  c.eval_batch_size = 96
  return c
