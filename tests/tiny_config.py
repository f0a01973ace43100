"""A config small enough for tests: `--config=tests/tiny_config.py:DATA_DIR` (synthetic data)."""

from rlt_jax.training import recipes


def get_config(data_dir: str):
  c = recipes.base("tiny", "k400", rlt=True)
  c.model.update(num_classes=8, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=16,
                 image_size=32, num_frames=4, dtype="float32", attention="xla", drop_path=0.1)
  c.data.update(train=f"{data_dir}/train.tfrecord-*", val=f"{data_dir}/val.tfrecord-*",
                final="", flip=False, stride=2, workers=0, sort_window=2)
  c.layout.update(capacity_step=4, stream_buckets=4, calibration_batches=3)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 8
  c.warmup_epochs = 0.5
  c.optim.lr = 0.3             # 1e-2 at batch 8: steps that visibly move the loss
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every = 0
  return c
