"""Quick start: a tiny ViT learns the project's synthetic action dataset, with RLT, on a CPU.

    python -m rlt_jax.main --config=configs/demo.py --workdir=/tmp/rlt_demo

Measured figures: see docs/benchmarks.md ("Quick start"). Without RLT, for comparison:
--config=configs/demo.py:rlt=False.
"""

from rlt_jax import recipes, synthetic


def get_config(arg=None):
  a = recipes.parse_arg(arg, rlt=True, seed=0)
  c = recipes.base("tiny", "k400", rlt=a.rlt)
  c.seed = a.seed
  c.model.update(num_classes=8, patch_size=16, image_size=64, num_frames=8, dtype="float32",
                 attention="xla", drop_path=0.0, length_embedding=a.rlt)
  directory = synthetic.default_dir()
  c.data.update(synthetic_dir=directory, train=f"{directory}/train.tfrecord-*",
                val=f"{directory}/val.tfrecord-*", final="", flip=False, stride=2,
                min_area=1.0, workers=0,  # no crops: the whole frame
                sort_window=0)  # short clips: sorting would only add compiled shapes
  c.layout.stream_buckets = 8  # few shapes to compile on a CPU
  c.batch_size = 32
  c.eval_batch_size = 80
  c.num_epochs = 30.0          # 75 steps per epoch
  c.warmup_epochs = 1.0
  c.optim.update(lr=1.6e-2, layer_decay=1.0)  # 2e-3 at batch 32; trained from scratch
  c.augment.update(mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0)
  c.log_every = 150
  c.checkpoint_every = 750
  c.eval_every = 750
  return c
