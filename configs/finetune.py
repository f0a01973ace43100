"""Fine-tune a VideoMAE-2 ViT on Kinetics-400 or Something-Something v2, with or without RLT.

    python -m rlt_jax.main --workdir=/ckpt/k400_b_rlt \
        --config='configs/finetune.py:variant=B/16,dataset=k400,rlt=True' \
        --config.init_from=models/videomae2_b_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' \
        --config.data.val='/data/k400/val.tfrecord-*'

Arguments (comma-separated, all optional): variant = S/16 | B/16 | L/16 | H/16 | g/14
(default B/16); dataset = k400 | ssv2; rlt = True | False; length_embedding (RLT's run-length
embedding); stride (1 for high frame rate, where RLT gains most); frames (e.g. 32); runlocal
(a seconds-long smoke run of the same code: batch 8, 4 steps, one view).
Data: `python data/build_tfrecords.py --format kinetics|ssv2 ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes 400`);
without it the model trains from scratch, which is not the recipe.
Expected, from the paper (not reproduced here: no Kinetics copy on the project's machines):
K400 top-1 ViT-B 80.9%, ViT-L 84.7%, ViT-H 86.2%, the same with RLT; RLT keeps ~2/3 of the tokens
at stride 4 and fewer at stride 1. Every kept token is trained on (no capacity cap).
Cost: see docs/benchmarks.md for the measured step times. Every variant scans its blocks
(model.scan: one block compiled for all); H/16 and g/14 also remat each and shard parameters
over all devices.
"""

from rlt_jax.training import recipes


def get_config(arg=None):
  return recipes.finetune(arg)
