"""ViT-L/16 on Kinetics-400 with RLT.

    python -m rlt_jax.main --config=configs/k400_vitl_rlt.py --workdir=gs://BUCKET/k400_vitl_rlt \
        --config.init_from=models/videomae2_l_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' --config.data.val='/data/k400/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format kinetics ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
400`); without it the model trains from scratch, which is not the recipe.
Expected: 84.7% top-1 as without RLT (paper); not reproduced here.
Cost: about 0.7x of k400_vitl.py. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("L/16", "k400", rlt=True)
  # Training pads each clip to 1152 of 1568 tokens (Kinetics keeps ~2/3 on average); a clip
  # that keeps more loses its least-changed tokens (counted in the log as overflow). Evaluation
  # is always exact (capacity buckets).
  c.rlt.update(capacity=1152, overflow="drop_least_changed")
  return c
