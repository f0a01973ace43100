"""ViT-B/16 on Something-Something v2 with RLT (no flips).

    python -m rlt_jax.main --config=configs/ssv2_vitb_rlt.py --workdir=gs://BUCKET/ssv2_vitb_rlt \
        --config.init_from=models/videomae2_b_k710 \
        --config.data.train='/data/ssv2/train.tfrecord-*' --config.data.val='/data/ssv2/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format ssv2 ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
174`); without it the model trains from scratch, which is not the recipe.
Expected: SSv2 has more motion, so RLT removes fewer tokens than on Kinetics; not reproduced here.
Cost: somewhat less than ssv2_vitb.py. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("B/16", "ssv2", rlt=True)
  # Training pads each clip to 1152 of 1568 tokens (Kinetics keeps ~2/3 on average); a clip
  # that keeps more loses its least-changed tokens (counted in the log as overflow). Evaluation
  # is always exact (capacity buckets).
  c.rlt.update(capacity=1152, overflow="drop_least_changed")
  return c
