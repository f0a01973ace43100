"""ViT-B/16 on Kinetics-400, all 1568 tokens (the baseline).

    python -m rlt_jax.main --config=configs/k400_vitb.py --workdir=gs://BUCKET/k400_vitb \
        --config.init_from=models/videomae2_b_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' --config.data.val='/data/k400/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format kinetics ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
400`); without it the model trains from scratch, which is not the recipe.
Expected: fine-tuned from VideoMAE-2 ViT-B (init_from): the release reports 80.9% top-1 (4 clips x 3 crops); not reproduced here.
Cost: 100 epochs of 240k clips; the paper's baseline for the 30% wall-clock saving. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("B/16", "k400", rlt=False)
  return c
