"""ViT-H/16 on Kinetics-400, all tokens (FSDP over 8 devices).

    python -m rlt_jax.main --config=configs/k400_vith.py --workdir=gs://BUCKET/k400_vith \
        --config.init_from=models/videomae2_h_k710 \
        --config.data.train='/data/k400/train.tfrecord-*' --config.data.val='/data/k400/val.tfrecord-*'

Data: `python data/build_tfrecords.py --format kinetics ...` (README, "Data").
init_from: a converted VideoMAE-2 checkpoint (`python -m rlt_jax.convert ... --num_classes
400`); without it the model trains from scratch, which is not the recipe.
Expected: the release reports 86.2% top-1 for VideoMAE-2 ViT-H; not reproduced here.
Cost: about 7x ViT-B. Recipe: rlt_jax/recipes.py (the release's, with layer decay applied).
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("H/16", "k400", rlt=False)
  c.mesh.update(data=-1, fsdp=8)  # parameters and Adam state split 8 ways
  c.model.remat = True
  return c
