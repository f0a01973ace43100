"""The base config every file in configs/ starts from: the RLT release's fine-tuning recipe.

AdamW (0.9, 0.999), weight decay 0.05 (none on biases, norms, tables), peak lr 1.5e-3 ×
batch/256, 5 warmup epochs then cosine to 1e-6 × batch/256, 100 epochs (Kinetics), CutMix α 1
/ Mixup α 0.8 (switch 0.5, always on), label smoothing 0.1, random erasing 0.25, drop path 0.1,
layer decay 0.75 (applied, unlike the release). 16 frames at stride 4, 224², flips except SSv2.
Optional settings are `ml_collections` placeholders: None until set on the command line.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

DATASETS = {
    # name: (classes, flip, epochs, train files, val files) – paths are placeholders to override
    "k400": (400, True, 100.0, "/data/k400/train.tfrecord-*", "/data/k400/val.tfrecord-*"),
    "ssv2": (174, False, 40.0, "/data/ssv2/train.tfrecord-*", "/data/ssv2/val.tfrecord-*"),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'variant=B/16,rlt=True' → ConfigDict over `defaults` (values parsed by their type)."""
  values = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r}: expected one of {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected True or False")
      values[key] = value.lower() in ("true", "1")
    else:
      values[key] = kind(value)
  return values


def base(variant: str = "B/16", dataset: str = "k400", *, rlt: bool = False
         ) -> ml_collections.ConfigDict:
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r}: expected one of {sorted(DATASETS)}")
  classes, flip, epochs, train, val = DATASETS[dataset]
  c = ml_collections.ConfigDict()
  c.mode = "train"             # or "eval": evaluate init_from on data.final (else data.val)
  c.init_from = placeholder(str)  # a converted / exported model directory to start from
  c.seed = 0                   # parameters, data order and augmentation all derive from it

  c.model = ml_collections.ConfigDict(dict(
      variant=variant,         # a name in rlt_jax/models/vit.py VARIANTS (tiny, S/16 … g/14)
      num_classes=classes,     # the classifier head's size
      dtype="bfloat16",        # activations: float32 | bfloat16 | float16 (params stay fp32)
      attention="auto",        # xla | cudnn | splash | auto (see models/attention.py)
      remat="none",            # none | full | dots: recompute blocks in the backward pass
      dropout=0.0,             # inside blocks
      drop_path=0.1,           # stochastic depth, linear over depth, one draw per clip
      head_dropout=0.0,        # before the head
      length_embedding=False,  # add a learned embedding of each token's run length (RLT)
  ))
  for name in ("patch_size", "tubelet_size", "num_frames", "image_size", "width", "depth",
               "num_heads", "mlp_dim"):
    c.model[name] = placeholder(int)  # None: the variant's own value
  # The blocks as one nn.scan (one block compiled for all; on a CPU a train step as fast as
  # unrolled blocks, docs/benchmarks.md). None: scan unless ToMe (whose token count changes
  # from block to block) is on.
  c.model.scan = placeholder(bool)

  c.rlt = ml_collections.ConfigDict(dict(
      policy="rlt" if rlt else "none",  # none | rlt | random: which tokens each clip keeps
      threshold=0.1,           # τ of 'rlt', on ImageNet-normalised pixels
      keep_fraction=0.5,       # p of 'random'
      reference="previous",    # 'rlt' compares a tubelet with: previous (the release) |
                               # run_start (the start of its run: drift cannot hide)
      mask_before_mix=False,   # train: each clip's mask before Mixup/CutMix/erasing, then
                               # combined (docs/rlt.md); False: after them, as the release
  ))
  c.rlt.max_tokens = placeholder(int)  # a lossy cap per clip (most-changed kept); None: never

  c.layout = ml_collections.ConfigDict(dict(
      kind="stream",           # stream | padded: how kept tokens sit in static shapes
      capacity_step=128,       # per-clip attention rows are multiples of this
      stream_buckets=16,       # stream lengths are multiples of 1/this of all tokens
      shapes=16,               # RLT training: at most this many static shapes, chosen before
                               # the first step from the first batches' kept counts (0: plan
                               # each batch exactly, compiling every new shape as it comes)
      calibration_batches=16,  # batches whose kept counts choose those shapes
  ))
  c.layout.capacity = placeholder(int)  # a fixed row capacity; a clip keeping more: error

  c.tome = ml_collections.ConfigDict(dict(
      r=0,                     # Token Merging: tokens merged per block (0: off)
  ))

  c.data = ml_collections.ConfigDict(dict(
      train=train,             # training shards (comma-separated globs, local or gs://)
      val=val,                 # shards validated on every eval_every steps (val_views)
      final=val,               # shards of the final evaluation (final_views); Kinetics has
                               # no public test set, so the val shards by default
      synthetic_dir="",        # generate the demo dataset here first (configs/demo.py)
      synthetic_size=64,       # its frames' side, in pixels
      synthetic_frames=24,     # its videos' length, in frames
      flip=flip,               # random horizontal flips in training (never for SSv2)
      stride=4,                # frames between sampled frames, in source frames
      min_area=0.5,            # random resized crop: smallest area share
      val_views="1x1",         # clips × crops per video for periodic validation
      final_views="4x3",       # clips × crops per video for the final evaluation
      workers=8,               # decoding processes (0: threads in this process)
      prefetch=2,              # batches decoded ahead (host memory ∝ this)
      sort_window=16,          # sort clips by kept tokens within this many batches (0: off)
      strict=False,            # a bad record or label stops the run instead of being skipped
      max_bad_fraction=0.05,   # stop when more records than this share of recent ones are bad
  ))
  c.data.source_fps = placeholder(float)  # if set, stride counts frames at this rate

  c.batch_size = 256           # global; lr scales with batch/256
  c.eval_batch_size = 128      # global
  c.grad_accum_steps = 1       # micro-batches per step (memory ÷ this)
  c.num_epochs = epochs
  c.total_steps = placeholder(int)  # if set, overrides num_epochs
  c.warmup_epochs = 5.0

  c.optim = ml_collections.ConfigDict(dict(
      lr=1.5e-3,               # peak, at batch 256 (scaled linearly)
      min_lr=1e-6,             # cosine floor, at batch 256
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.05,       # not on biases, norms and embedding tables
      layer_decay=0.75,        # lr × decay^(depth − layer)
      clip_grad_norm=0.0,      # 0: no clipping
  ))
  c.augment = ml_collections.ConfigDict(dict(
      mixup_alpha=0.8, cutmix_alpha=1.0,  # Beta parameters (0: off)
      mix_prob=1.0, switch_prob=0.5,      # chance to mix; chance of CutMix over Mixup
      label_smoothing=0.1,
      erase_prob=0.25,                    # random erasing, per clip
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                 # data-parallel axis (-1: the devices left)
      fsdp=1,                  # also data-parallel, and splits parameters/optimizer state
  ))
  c.log_every = 50             # steps between metric lines
  c.checkpoint_every = 1000    # steps between checkpoints
  c.keep_checkpoints = 3       # newest checkpoints kept
  c.eval_every = 5000          # steps between validations (0: only at the end)
  return c


def finetune(arg: str | None = None) -> ml_collections.ConfigDict:
  """The parameterised fine-tuning config; `arg` as in configs/finetune.py."""
  a = parse_arg(arg, variant="B/16", dataset="k400", rlt=False, stride=4, frames=16,
                length_embedding=False, runlocal=False)
  c = base(a.variant, a.dataset, rlt=a.rlt)
  c.data.stride = a.stride
  c.model.length_embedding = a.length_embedding
  if a.frames != 16:
    c.model.num_frames = a.frames
  if a.variant in ("H/16", "g/14"):
    c.model.remat = "full"     # activations of 32–40 blocks do not fit otherwise
    c.mesh.update(data=1, fsdp=-1)
  if a.runlocal:               # a seconds-long smoke run of the same code on one machine
    c.update(batch_size=8, eval_batch_size=8, total_steps=4, log_every=1,
             checkpoint_every=2, eval_every=0, warmup_epochs=0.0)
    c.data.update(workers=0, val_views="1x1", final_views="1x1")
  return c
