"""ViT-B/16 on Something-Something v2, all tokens (no flips).

    python -m rlt_jax.main --config=configs/ssv2_vitb.py --workdir=gs://BUCKET/ssv2_vitb \
        --config.init_from=models/videomae2_b_k710 \
        --config.data.train='/data/ssv2/train.tfrecord-*' --config.data.val='/data/ssv2/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format ssv2 ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
174`); without it the model trains from scratch, which is not the recipe.
Expected: VideoMAE-2-class ViT-B on SSv2 reaches ~70% top-1 from a good pre-trained checkpoint; not reproduced here.
Cost: 40 epochs of 169k clips. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("B/16", "ssv2", rlt=False)
  return c
