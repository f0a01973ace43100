"""ViT-B/16 on Kinetics-400 with RLT (τ = 0.1): `configs/finetune.py:variant=B/16,rlt=True`.

    python -m rlt_jax.main --config=configs/k400_vitb_rlt.py --workdir=/ckpt/k400_vitb_rlt \
        --config.init_from=models/videomae2_b_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' \
        --config.data.val='/data/k400/val.tfrecord-*'

Expected (the paper): the same top-1 as without RLT (80.9%) with ~30% less fine-tuning
wall-clock; not reproduced here. Every kept token is trained on; batches are sorted by kept
count within windows of 16 and laid out as one token stream (docs/benchmarks.md).
"""

from rlt_jax.training import recipes


def get_config(arg=None):
  return recipes.finetune("variant=B/16,dataset=k400,rlt=True," + (arg or ""))
