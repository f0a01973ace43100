"""A config → the objects of a run, and every check that needs no compiling and writes nothing.

`check` names each mistake it finds by its config key (`ConfigError`) before anything is
built or written; the factories (`token_policy`, `token_layout`, `model_spec`, `build_model`,
`sampling`, `clip_cost`) are what the run, the evaluator and the tests build from a config.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from rlt_jax import layout, rlt
from rlt_jax.checkpoints import checkpoint
from rlt_jax.data import input_pipeline, synthetic, video
from rlt_jax.models import tome, vit
from rlt_jax.runtime import sharding


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is compiled."""



def token_policy(config: ml_collections.ConfigDict) -> rlt.Policy:
  """Which tokens each clip keeps (config.rlt)."""
  r = config.rlt
  return rlt.Policy(kind=r.policy, threshold=float(r.threshold), keep_fraction=r.keep_fraction,
                    max_tokens=r.max_tokens, reference=r.reference)


def token_layout(config: ml_collections.ConfigDict) -> layout.Layout:
  """How kept tokens are laid out in static shapes (config.layout)."""
  l = config.layout
  return layout.Layout(kind=l.kind, capacity_step=l.capacity_step,
                       stream_buckets=l.stream_buckets, capacity=l.capacity)


def model_spec(config: ml_collections.ConfigDict) -> vit.ModelSpec:
  """The architecture the config names, or the one saved with `init_from`."""
  if config.init_from:
    return checkpoint.read_spec(config.init_from)
  m = config.model
  shape = {k: m[k] for k in ("patch_size", "tubelet_size", "num_frames", "image_size", "width",
                             "depth", "num_heads", "mlp_dim") if m[k] is not None}
  return vit.ModelSpec.from_variant(m.variant, num_classes=m.num_classes,
                                    length_embedding=m.length_embedding, **shape)


def build_model(config: ml_collections.ConfigDict, spec: vit.ModelSpec, *,
                train: bool) -> vit.VisionTransformer:
  """The model of `spec` with the config's run-time settings (dropouts only when training)."""
  m = config.model
  merges = tome.schedule(config.tome.r, spec.depth, spec.num_tokens) if config.tome.r else ()
  return vit.build(spec, dtype=m.dtype, attention=m.attention, remat=m.remat, tome=merges,
                   scan=scans(config),
                   dropout=m.dropout if train else 0.0, drop_path=m.drop_path if train else 0.0,
                   head_dropout=m.head_dropout if train else 0.0)


def scans(config: ml_collections.ConfigDict) -> bool:
  """model.scan, or when unset: scan the blocks unless ToMe is on."""
  return config.model.scan if config.model.scan is not None else not config.tome.r


def parse_views(text: str, key: str) -> tuple[int, int]:
  """'4x3' → (clips, crops), or a ConfigError naming `key`."""
  try:
    return video.parse_views(text, key)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def sampling(config: ml_collections.ConfigDict, spec: vit.ModelSpec,
             views: str = "1x1") -> input_pipeline.Sampling:
  """How clips are cut for this model (frames, size) as the config's data section says."""
  d = config.data
  return input_pipeline.Sampling(
      num_frames=spec.num_frames, stride=d.stride, source_fps=d.source_fps,
      image_size=spec.image_size, flip=d.flip, min_area=d.min_area,
      views=parse_views(views, "config.data views"))


def clip_cost(config: ml_collections.ConfigDict, spec: vit.ModelSpec) -> rlt.KeptCount:
  """The cost by which clips are ordered before batching: the tokens each one keeps."""
  return rlt.KeptCount(token_policy(config), spec.tubelet_size, spec.patch_size)


def check(config: ml_collections.ConfigDict, *, files_too: bool = True) -> vit.ModelSpec:
  """Every mistake we can see without compiling: names, sizes, divisibility, and (unless
  `files_too` is False) the data and model files."""
  if config.mode not in ("train", "eval"):
    raise ConfigError(f"config.mode={config.mode!r}: expected 'train' or 'eval'")
  if config.mode == "eval" and not config.init_from and files_too:
    raise ConfigError("config.mode='eval' needs config.init_from (a converted model directory "
                      "or a training workdir's exported model)")
  try:
    spec = model_spec(config if files_too else _without_init(config))
    build_model(config, spec, train=True)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.model: {e}") from None
  if config.model.remat not in vit.REMAT_POLICIES:
    raise ConfigError(f"config.model.remat={config.model.remat!r}: expected one of "
                      f"{sorted(vit.REMAT_POLICIES)}")
  if config.model.scan is not None and not isinstance(config.model.scan, bool):
    raise ConfigError(f"config.model.scan={config.model.scan!r}: expected true, false or unset")
  if config.model.scan and config.tome.r:
    raise ConfigError(f"config.model.scan=True with config.tome.r={config.tome.r}: ToMe changes "
                      "the token count from block to block and a scan runs one shape through "
                      "all; turn one of them off")
  for name, make in (("rlt", token_policy), ("layout", token_layout)):
    try:
      make(config)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{name}: {e}") from None
  if not isinstance(config.rlt.mask_before_mix, bool):
    raise ConfigError(f"config.rlt.mask_before_mix={config.rlt.mask_before_mix!r}: expected "
                      "true or false")
  if config.rlt.mask_before_mix and config.rlt.max_tokens is not None:
    raise ConfigError("config.rlt.mask_before_mix=True with config.rlt.max_tokens: the cap "
                      "ranks tokens by their change on the mixed clips; use one of them")
  for name, least in (("shapes", 0), ("calibration_batches", 1)):
    value = config.layout[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ConfigError(f"config.layout.{name}={value!r}: expected an integer ≥ {least}")
  if not isinstance(config.tome.r, int) or config.tome.r < 0:
    raise ConfigError(f"config.tome.r={config.tome.r!r}: expected an integer ≥ 0")
  parse_views(config.data.val_views, "config.data.val_views")
  parse_views(config.data.final_views, "config.data.final_views")
  positive = ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every",
              "checkpoint_every", "keep_checkpoints")
  for name in positive:
    if not isinstance(config[name], int) or config[name] < 1:
      raise ConfigError(f"config.{name}={config[name]!r}: expected a positive integer")
  for name in ("prefetch",):
    if config.data[name] < 1:
      raise ConfigError(f"config.data.{name}={config.data[name]!r}: expected ≥ 1")
  if not 0.0 <= config.data.max_bad_fraction <= 1.0:
    raise ConfigError(f"config.data.max_bad_fraction={config.data.max_bad_fraction!r}: "
                      "expected a share in [0, 1]")
  if config.total_steps is not None and config.total_steps < 1:
    raise ConfigError(f"config.total_steps={config.total_steps!r}: expected ≥ 1 or unset")
  _check_numbers(config)
  if config.data.synthetic_dir and files_too:
    try:
      synthetic.check_folder(os.path.abspath(config.data.synthetic_dir))
    except FileExistsError as e:
      raise ConfigError(f"config.data.synthetic_dir: {e}") from None
  devices = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    size = config[name]
    if size % devices or size % jax.process_count():
      raise ConfigError(f"config.{name}={size} is not divisible by the {devices} devices "
                        f"({jax.process_count()} processes)")
  if config.batch_size % (config.grad_accum_steps * devices):
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"grad_accum_steps × devices = {config.grad_accum_steps} × {devices}")
  try:
    sharding.make_mesh(**config.mesh)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.mesh: {e}") from None
  splits = (["train"] if config.mode == "train" else []) + [
      s for s in ("val", "final") if config.data[s]]
  if not files_too:
    return spec
  for split in splits:
    if generated(config, split):
      continue  # written by the run itself (`run.write_synthetic`), once the workdir is locked
    try:
      records = input_pipeline.num_examples(config.data[split])
      classes = input_pipeline.read_classes(config.data[split])
    except (FileNotFoundError, ValueError) as e:
      advice = ("" if "build_tfrecords" in str(e) else ". Build the shards with python "
                "data/build_tfrecords.py (README, 'Data')")
      raise ConfigError(f"config.data.{split}: {e}{advice}, or point --config.data.{split} at "
                        "them") from None
    if classes and len(classes) != spec.num_classes:
      raise ConfigError(
          f"config.data.{split}: its classes.txt lists {len(classes)} classes but the model "
          f"has {spec.num_classes} (config.model.num_classes, or init_from's head): a label "
          "the data cannot have would be trained, or one the model cannot predict evaluated")
    if split == "train" and records < config.batch_size:
      raise ConfigError(f"config.batch_size={config.batch_size}: the training data "
                        f"({config.data.train}) holds {records} videos, fewer than one batch")
  return spec


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Numbers that would train on nonsense: non-finite values anywhere, strides and epochs
  that select no frames or no steps, learning rates that learn nothing."""
  for key, value in _leaves(config):
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{key}={value!r}: expected a finite number")
  if not isinstance(config.data.stride, (int, float)) or config.data.stride <= 0:
    raise ConfigError(f"config.data.stride={config.data.stride!r}: expected a positive number "
                      "of frames between sampled frames")
  if config.data.source_fps is not None and config.data.source_fps <= 0:
    raise ConfigError(f"config.data.source_fps={config.data.source_fps!r}: expected > 0 or unset")
  if config.mode == "train" and config.total_steps is None and not config.num_epochs > 0:
    raise ConfigError(f"config.num_epochs={config.num_epochs!r}: expected > 0 (or set "
                      "config.total_steps)")
  if config.mode == "train" and not config.optim.lr > 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr!r}: expected > 0")
  for name in ("min_lr", "weight_decay", "clip_grad_norm"):
    if config.optim[name] < 0:
      raise ConfigError(f"config.optim.{name}={config.optim[name]!r}: expected ≥ 0")
  if config.warmup_epochs < 0:
    raise ConfigError(f"config.warmup_epochs={config.warmup_epochs!r}: expected ≥ 0")


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted key, value) of every field, sub-configs included."""
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{name}.")
    else:
      yield prefix + name, value


def generated(config: ml_collections.ConfigDict, split: str) -> bool:
  """Whether a split's shards are the synthetic dataset the run writes (data.synthetic_dir)."""
  folder = config.data.synthetic_dir
  return bool(folder) and all(
      os.path.abspath(p.strip()).startswith(os.path.abspath(folder) + os.sep)
      for p in config.data[split].split(",") if p.strip())


def _without_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from = None
  return config
