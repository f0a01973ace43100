"""ViT-L/16 on Kinetics-400, all tokens.

    python -m rlt_jax.main --config=configs/k400_vitl.py --workdir=gs://BUCKET/k400_vitl \
        --config.init_from=models/videomae2_l_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' --config.data.val='/data/k400/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format kinetics ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
400`); without it the model trains from scratch, which is not the recipe.
Expected: the release reports 84.7% top-1 for VideoMAE-2 ViT-L; not reproduced here.
Cost: about 3.5x ViT-B. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("L/16", "k400", rlt=False)
  return c
