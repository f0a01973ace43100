"""The base config every file in configs/ starts from: the RLT release's fine-tuning recipe.

AdamW (0.9, 0.999), weight decay 0.05 (none on biases, norms, tables), peak lr 1.5e-3 ×
batch/256, 5 warmup epochs then cosine to 1e-6 × batch/256, 100 epochs (Kinetics), CutMix α 1
/ Mixup α 0.8 (switch 0.5, always on), label smoothing 0.1, random erasing 0.25, drop path 0.1,
layer decay 0.75 (applied, unlike the release). 16 frames at stride 4, 224², flips except SSv2.
"""

from __future__ import annotations

import ml_collections

DATASETS = {
    # name: (classes, flip, train, val, test) – paths are placeholders to override
    "k400": (400, True, "/data/k400/train.tfrecord-*", "/data/k400/val.tfrecord-*",
             "/data/k400/val.tfrecord-*"),
    "ssv2": (174, False, "/data/ssv2/train.tfrecord-*", "/data/ssv2/val.tfrecord-*",
             "/data/ssv2/val.tfrecord-*"),
}


def base(variant: str = "B/16", dataset: str = "k400", *, rlt: bool = False
         ) -> ml_collections.ConfigDict:
  classes, flip, train, val, test = DATASETS[dataset]
  c = ml_collections.ConfigDict()
  c.mode = "train"             # or "eval": evaluate init_from on the test (else val) split
  c.init_from = ""             # a converted / exported model directory to fine-tune or evaluate
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      variant=variant, num_classes=classes, dtype="bfloat16", attention="auto", remat=False,
      dropout=0.0, drop_path=0.1, head_dropout=0.0, length_embedding=False,
      patch_size=0, tubelet_size=0, num_frames=0, image_size=0,  # 0: the variant's default
      width=0, depth=0, num_heads=0, mlp_dim=0))

  c.rlt = ml_collections.ConfigDict(dict(
      policy="rlt" if rlt else "none", threshold=0.1, keep_fraction=0.5,
      capacity=0,                # training capacity per clip; 0 = all N tokens
      packing=False, row_length=0, num_rows=0,  # or pack clips into num_rows × row_length
      overflow="full"))          # an overflowing batch runs at capacity N: exact, never lossy

  c.data = ml_collections.ConfigDict(dict(
      train=train, val=val, test=test, synthetic_dir="", flip=flip, stride=4, source_fps=0.0,
      min_area=0.5, test_clips=4, test_crops=3, workers=8, strict=False))

  c.batch_size = 256           # global; lr scales with batch/256
  c.eval_batch_size = 128
  c.grad_accum_steps = 1
  c.num_epochs = 100.0 if dataset == "k400" else 40.0
  c.total_steps = 0            # if set, overrides num_epochs
  c.warmup_epochs = 5.0

  c.optim = ml_collections.ConfigDict(dict(
      lr=1.5e-3, min_lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, layer_decay=0.75,
      clip_grad_norm=0.0))
  c.augment = ml_collections.ConfigDict(dict(
      mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1,
      erase_prob=0.25))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 5000          # validation (1 view); the test split (4 × 3) runs at the end
  return c
