"""Quick start: a tiny ViT learns the project's synthetic action dataset, with RLT, on a CPU.

    python -m rlt_jax.main --config=configs/demo.py --workdir=/tmp/rlt_demo

The first run writes the dataset to /tmp/rlt_synthetic (2400 train / 240 val videos of 24
frames at 64², 8 motion classes; ~20 s, 170 MB). Expected (measured on a 2-core CPU): about
3 minutes, 900 steps, validation top-1 37% (chance 12.5%), RLT keeping 37 of the 64 tokens of
each 8 × 64² clip (16² patches). Without RLT, for comparison (67% top-1, 2 min 20 s; see
docs/benchmarks.md): add --config.rlt.policy=none --config.rlt.packing=False
--config.rlt.num_rows=0 --config.rlt.row_length=0.
"""

from rlt_jax import recipes


def get_config():
  c = recipes.base("tiny", "k400", rlt=True)
  c.model.update(num_classes=8, patch_size=16, image_size=64, num_frames=8, dtype="float32",
                 attention="xla", drop_path=0.0, length_embedding=True)
  # 32 clips of 64 tokens packed into 20 rows of 64 (62% of the padded size); a batch that
  # does not fit runs unpacked at all 64 tokens instead.
  c.rlt.update(packing=True, row_length=64, num_rows=20)
  c.data.update(synthetic_dir="/tmp/rlt_synthetic", train="/tmp/rlt_synthetic/train.tfrecord-*",
                val="/tmp/rlt_synthetic/val.tfrecord-*", test="", flip=False, stride=2,
                min_area=1.0, workers=0)  # no crops: the whole 64² frame
  c.batch_size = 32
  c.eval_batch_size = 80
  c.num_epochs = 12.0          # 75 steps per epoch
  c.warmup_epochs = 1.0
  c.optim.update(lr=1.6e-2, layer_decay=1.0)  # 2e-3 at batch 32; trained from scratch
  c.augment.update(mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0)
  c.log_every = 75
  c.checkpoint_every = 300
  c.eval_every = 300
  return c
