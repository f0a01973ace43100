"""ViT-S/16 on Kinetics-400, all tokens.

    python -m rlt_jax.main --config=configs/k400_vits.py --workdir=gs://BUCKET/k400_vits \
        --config.init_from=models/videomae2_s_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' --config.data.val='/data/k400/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format kinetics ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
400`); without it the model trains from scratch, which is not the recipe.
Expected: fine-tuned from the VideoMAE-2 ViT-S checkpoint (init_from), top-1 in the VideoMAE-2 ViT-S range (~79-80% at 4x3 views); not reproduced here.
Cost: about a quarter of ViT-B's cost. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("S/16", "k400", rlt=False)
  return c
