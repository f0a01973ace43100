"""The training loop: data → (device) normalise, augment, RLT, ViT → loss → AdamW, on a mesh.

Read top to bottom: check the config, build mesh, model, data and optimizer, restore the latest
checkpoint if the workdir has one, then step. Each step runs in two phases (`TrainStep`): the
device computes every clip's exact kept count, the host plans the static token layout from
them (the one per-step wait on the device: a few integers), and the compiled update for that
plan runs. Other waits come at logging, checkpoint and evaluation intervals. A resumed run (after SIGTERM, SIGKILL or a crash) restores
parameters, optimizer state, step, RNG and the data iterator, and continues with exactly the
batches and losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax.sharding import NamedSharding, PartitionSpec as P

from rlt_jax import (augment, checkpoint, console, evaluate, files, forward, input_pipeline,
                     layout, optim, rlt, sharding, synthetic, two_phase, video)
from rlt_jax.models import tome, vit


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is compiled."""


class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- setup

def policy(config: ml_collections.ConfigDict) -> rlt.Policy:
  r = config.rlt
  return rlt.Policy(kind=r.policy, threshold=float(r.threshold), keep_fraction=r.keep_fraction,
                    max_tokens=r.max_tokens)


def token_layout(config: ml_collections.ConfigDict) -> layout.Layout:
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
  try:
    return video.parse_views(text, key)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def sampling(config: ml_collections.ConfigDict, spec: vit.ModelSpec, views: str = "1x1", *,
             counts: bool = True) -> input_pipeline.Sampling:
  """How clips are cut; with `counts`, examples also carry their host kept count ("kept")."""
  d = config.data
  return input_pipeline.Sampling(
      num_frames=spec.num_frames, stride=d.stride, source_fps=d.source_fps,
      image_size=spec.image_size, flip=d.flip, min_area=d.min_area,
      views=parse_views(views, "config.data views"), tubelet_size=spec.tubelet_size,
      patch_size=spec.patch_size, policy=policy(config) if counts else None)


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
  for name, make in (("rlt", policy), ("layout", token_layout)):
    try:
      make(config)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{name}: {e}") from None
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
    if _generated(config, split):
      continue  # written by the run itself (`write_synthetic`), once the workdir is locked
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


def _generated(config: ml_collections.ConfigDict, split: str) -> bool:
  """Whether a split's shards are the synthetic dataset the run writes (data.synthetic_dir)."""
  folder = config.data.synthetic_dir
  return bool(folder) and all(
      os.path.abspath(p.strip()).startswith(os.path.abspath(folder) + os.sep)
      for p in config.data[split].split(",") if p.strip())


def write_synthetic(config: ml_collections.ConfigDict) -> None:
  """Writes the synthetic dataset data.synthetic_dir names (the demo's data), unless it holds
  it already: a step of the run, after the config and workdir were checked."""
  try:
    synthetic.generate(config.data.synthetic_dir, size=config.data.synthetic_size,
                       num_frames=config.data.synthetic_frames)
  except (FileExistsError, ValueError) as e:
    raise ConfigError(f"config.data.synthetic_dir: {e}") from None


def _without_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from = None
  return config


# ----------------------------------------------------------------------------- the step

class TrainStep:
  """state, global batch → state, metrics, in two phases around a host plan.

  Phase 1 (`prepare`): normalise, mix, erase, apply the token policy; the exact kept counts
  come to the host, which picks the static token layout: the exact plan of those counts, or
  the cheapest of a fixed `layout.ShapeSet` (`use_shapes`) that holds them. Phase 2 (`update`,
  compiled once per plan): tokenise, forward, backward, AdamW. Non-finite losses skip the
  update and are recorded. Both phases run through the shared `two_phase.TwoPhase` driver;
  `begin` (phase 1 of a step) may be called before `finish` of the previous step.
  """

  def __init__(self, model: vit.VisionTransformer, tx, lr_schedule, aug: augment.Augment,
               token_policy: rlt.Policy, token_layout: layout.Layout, accum_steps: int,
               mesh: jax.sharding.Mesh, state_shardings: Any = None):
    self.model, self.tx, self.lr_schedule, self.aug = model, tx, lr_schedule, aug
    self.policy, self.layout, self.accum = token_policy, token_layout, accum_steps
    self.mesh, self.groups = mesh, forward.batch_groups(mesh)
    self.shapes: layout.ShapeSet | None = None
    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    self.driver = two_phase.TwoPhase(
        self.prepare, self.update, self._plan, mesh=mesh,
        first_shardings=({"frames": batch, "targets": batch, "mask": batch, "weights": batch,
                          "label": batch}, replicated),
        second_shardings=(state_shardings, replicated), donate=True)

  @property
  def plans(self) -> set[layout.Plan]:
    """Every plan compiled so far."""
    return self.driver.plans

  def use_shapes(self, shapes: layout.ShapeSet) -> None:
    """From now on every batch runs at the cheapest of these shapes that holds it."""
    self.shapes = shapes

  def _plan(self, counts: np.ndarray) -> layout.Plan:
    if self.shapes is not None:
      return self.shapes.fit(counts)
    return layout.plan(counts, self.layout, num_tokens=self.model.spec.num_tokens,
                       groups=self.groups, micro_batches=self.accum)

  def prepare(self, rng, step, batch):
    spec = self.model.spec
    aug_key, erase_key, token_key = jax.random.split(
        jax.random.fold_in(jax.random.fold_in(rng, step), 0), 3)
    frames = rlt.normalize(batch["frames"])
    frames, targets = augment.mix(aug_key, frames, batch["label"], self.aug)
    frames = augment.erase(erase_key, frames, self.aug)
    mask = rlt.select(frames, self.policy, tubelet_size=spec.tubelet_size,
                      patch_size=spec.patch_size, rng=token_key, valid=batch["valid"])
    # the patch embedding casts its input to the model's dtype: casting here halves phase 2's
    # input (bf16) and changes nothing; the mask was decided on float32 values
    prepared = {"frames": frames.astype(self.model.dtype), "targets": targets, "mask": mask,
                "weights": batch["valid"].astype(jnp.float32), "label": batch["label"]}
    return prepared, mask.sum(-1, dtype=jnp.int32)

  def _loss(self, params, frames, mask, targets, weights, rng, plan):
    spec = self.model.spec
    tokens = layout.tokenize(frames, mask, plan, tubelet_size=spec.tubelet_size,
                             patch_size=spec.patch_size)
    logits = self.model.apply({"params": params}, tokens, train=True, rngs={"dropout": rng})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(jnp.sum(targets * logp, -1) * weights), logits

  def update(self, state, prepared, plan: layout.Plan):
    step, params = state["step"], state["params"]
    model_key = jax.random.fold_in(jax.random.fold_in(state["rng"], step), 1)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    frames, mask = prepared["frames"], prepared["mask"]
    targets, weights = prepared["targets"], prepared["weights"]
    k = self.accum
    if k == 1:
      (loss_sum, logits), grads = grad_fn(params, frames, mask, targets, weights, model_key,
                                          plan)
    else:
      split = lambda x: layout.split_micro_batches(x, k)

      def micro(carry, xs):
        f, m, t, w, j = xs
        (l, o), g = grad_fn(params, f, m, t, w, jax.random.fold_in(model_key, j), plan)
        return jax.tree_util.tree_map(jnp.add, carry, (l, g)), o

      zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
      (loss_sum, grads), logits = jax.lax.scan(
          micro, zeros, (split(frames), split(mask), split(targets), split(weights),
                         jnp.arange(k)))
      logits = layout.merge_micro_batches(logits)
    with jax.named_scope("optimizer"):  # device_time counts everything here as the optimizer
      count = jnp.maximum(weights.sum(), 1.0)
      grads = jax.tree_util.tree_map(lambda g: g / count, grads)
      loss = loss_sum / count
      updates, opt_state = self.tx.update(grads, state["opt_state"], params)
      new_params = jax.tree_util.tree_map(jnp.add, params, updates)
      grad_norm = optax.tree.norm(grads)
      # finite loss and gradients are not enough: a non-finite learning rate turns them into
      # non-finite updates. (Finite gradients keep Adam's moments finite.)
      finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                & jnp.isfinite(optax.tree.norm(updates)))
      keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                                     new, old)
      new_state = {
          "params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
          "step": step + 1, "rng": state["rng"],
          "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"]),
      }
    correct = (jnp.argmax(logits, -1) == prepared["label"]).astype(jnp.float32)
    kept = mask.sum(-1).astype(jnp.float32)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_schedule(step),
               "accuracy": jnp.sum(correct * weights) / count,
               "tokens_kept": jnp.sum(kept * weights) / count, "clips": weights.sum(),
               "slots": jnp.float32(plan.slots)}
    return new_state, metrics

  def begin(self, rng: jax.Array, step: int | jax.Array, batch: dict[str, jax.Array]
            ) -> two_phase.Pending:
    """Phase 1 of step `step` (its augmentation and mask), dispatched; needs no state but the
    run's RNG key, so it can run while the previous step's update still does."""
    return self.driver.begin(rng, jnp.int32(step), batch)

  def finish(self, state, pending: two_phase.Pending):
    """(new state, metrics) of the step whose phase 1 is `pending`; `state` is donated."""
    return self.driver.finish(state, pending)[0]

  def __call__(self, state, batch):
    return self.finish(state, self.begin(state["rng"], state["step"], batch))


# ----------------------------------------------------------------------------- the loop

class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (no host sync)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


class _Log:
  """Console (process 0), TensorBoard event files and metrics.jsonl in the workdir."""

  def __init__(self, workdir: str):
    self.main = jax.process_index() == 0
    self.writer = None
    if self.main:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = files.open_append(os.path.join(workdir, "metrics.jsonl"))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.main:
      return
    for key, value in values.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self.writer.add_scalar(key, value, step)
    self.writer.flush()
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.main:
      self.writer.close()
      self.jsonl.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or, with mode='eval', evaluate) as the config says; returns the final metrics.

  Nothing is written before the config and the workdir pass their checks and the workdir is
  locked: a refused run leaves nothing behind, and a refused second run touches nothing of
  the first one's.
  """
  spec = check(config)
  workdir = str(files.prepare_workdir(workdir))
  lock = files.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    console.log_to_file(workdir)
    if jax.process_index() == 0:
      files.remove_stale_temporaries(workdir)  # left by a run killed while writing
    if config.data.synthetic_dir and jax.process_index() == 0:
      write_synthetic(config)
    if config.data.synthetic_dir and jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("synthetic dataset written")
    mesh = sharding.make_mesh(**config.mesh)
    if config.mode == "eval":
      return run_eval(config, workdir, mesh, spec)
    return _train(config, workdir, mesh, spec)


def _train(config, workdir, mesh, spec) -> dict[str, Any]:
  model = build_model(config, spec, train=True)
  token_policy = policy(config)
  num_train = input_pipeline.num_examples(config.data.train)
  steps_per_epoch = max(1, num_train // config.batch_size)
  total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
  manager = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints"),
                                        keep=config.keep_checkpoints)
  model_dir = os.path.join(workdir, "model")
  if manager.latest_step() == total_steps and os.path.isdir(model_dir):
    console.say(f"{workdir} holds a finished run ({total_steps} steps); its model is in "
                f"{model_dir}. Nothing to do.")
    return {"finished": total_steps}
  start_time = time.perf_counter()

  costs = None
  if token_policy.kind == "rlt" and config.data.sort_window > 1:
    console.say("counting the tokens each training video keeps (once; cached in the workdir)")
    costs = input_pipeline.record_costs(
        config.data.train, sampling(config, spec), cache_dir=os.path.join(workdir, "cache"),
        process_index=jax.process_index(), process_count=jax.process_count(),
        workers=config.data.workers, strict=config.data.strict)
  dataset = input_pipeline.make_dataset(
      config.data.train, mode="train", sampling=sampling(config, spec, counts=False),
      batch_size=config.batch_size // jax.process_count(), seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      workers=config.data.workers, strict=config.data.strict, prefetch=config.data.prefetch,
      costs=costs, sort_window=config.data.sort_window)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)

  rng = jax.random.PRNGKey(config.seed)
  init_tokens = vit.example_tokens(spec)
  abstract_params = jax.eval_shape(lambda: model.init(rng, init_tokens)["params"])
  tx, lr_schedule = optim.make(config, abstract_params, depth=spec.depth,
                               total_steps=total_steps, warmup_steps=warmup_steps)

  def init_state(params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
            "rng": jax.random.fold_in(rng, 1), "bad_step": jnp.int32(-1)}

  abstract_state = jax.eval_shape(init_state, abstract_params)
  state_shardings = sharding.tree_shardings(mesh, abstract_state)
  init = jax.jit(init_state, out_shardings=state_shardings)
  if config.init_from:
    _, loaded = checkpoint.load_model(config.init_from)
    loaded = vit.arrange_blocks(loaded, scans(config))
    checkpoint.check_params(loaded, abstract_params, config.init_from)
    state = init(jax.device_put(loaded, state_shardings["params"]))
  else:
    params = jax.jit(lambda: model.init(rng, init_tokens)["params"],
                     out_shardings=state_shardings["params"])()
    state = init(params)

  aug = augment.Augment(num_classes=spec.num_classes, **config.augment)
  train_step = TrainStep(model, tx, lr_schedule, aug, token_policy, token_layout(config),
                         config.grad_accum_steps, mesh, state_shardings)
  run_rng = jax.random.fold_in(rng, 1)  # the state's key: phase 1 needs nothing else of it

  iterator = iter(dataset)
  if token_policy.kind == "rlt" and config.layout.shapes:
    train_step.use_shapes(_train_shapes(config, spec, train_step, iterator, mesh, run_rng))
  start = manager.latest_step()
  if start is not None:
    try:
      state, iterator, start = manager.restore(abstract_state, state_shardings, iterator)
    except checkpoint.NoRestorableCheckpoint:
      manager.close()
      raise
    console.say(f"resumed from step {start} ({manager.directory})")
  start = start or 0
  evaluator = evaluate.Evaluator(build_model(config, spec, train=False), token_policy,
                                 token_layout(config), mesh)
  log, preemption = _Log(workdir), _Preemption()
  bar = console.progress(total_steps, start, "train")
  data_check = _DataCheck(spec.num_classes, config.data.max_bad_fraction, config.data.strict)
  data_states: dict[int, Any] = {}  # step → the iterator's state before that step's batch

  def begin(step: int) -> two_phase.Pending:
    """Phase 1 of `step`, dispatched (its batch read, checked and sent to the devices)."""
    data_states[step] = iterator.get_state()
    return train_step.begin(run_rng, step, sharding.global_batch(mesh, data_check(
        next(iterator))))

  def iterator_state(step: int) -> Any:
    return data_states.pop(step) if step in data_states else iterator.get_state()

  queued, last_time, last_step, result, summary = [], time.perf_counter(), start, {}, {}
  ahead = None  # phase 1 of the next step, dispatched before this step's update
  try:
    for step in range(start, total_steps):
      if preemption.requested:
        if manager.latest_step() != step:
          manager.save(step, state, iterator_state(step), force=True)
        manager.wait()
        console.say(f"SIGTERM: saved step {step} in {manager.directory}; exiting")
        return {"preempted_at": step}
      pending = ahead if ahead is not None else begin(step)
      if step == start and train_step.shapes is not None:
        _compile_shapes(train_step, state, pending)
      ahead = begin(step + 1) if step + 1 < total_steps else None
      state, metrics = train_step.finish(state, pending)
      queued.append(metrics)
      done = step + 1
      bar.update(1)
      log_now = done % config.log_every == 0 or done == total_steps
      save_now = done % config.checkpoint_every == 0 or done == total_steps
      if log_now or save_now:
        _stop_if_not_finite(state, manager, check_state=save_now)
      if log_now:
        now = time.perf_counter()
        summary = _summarise(jax.device_get(queued), now - last_time, done - last_step,
                             spec.num_tokens)
        summary.update(epoch=done / steps_per_epoch, compiled_shapes=len(train_step.plans),
                       **data_check.totals())
        log.write(done, summary)
        bar.write(_metric_line(done, total_steps, summary))
        queued, last_time, last_step = [], now, done
      if save_now:
        manager.save(done, state, iterator_state(done))
      if config.eval_every and config.data.val and (done % config.eval_every == 0
                                                    or done == total_steps):
        result = _evaluate(config, evaluator, spec, state["params"], "val", done, log, workdir,
                           bar)
    bar.close()
    data_check.finish()
    if config.data.final:
      result = _evaluate(config, evaluator, spec, state["params"], "final", total_steps, log,
                         workdir, bar)
    checkpoint.save_model(model_dir, state["params"], spec, overwrite=True)
  finally:
    bar.close()
    manager.close()
    preemption.restore()
    log.close()
  console.say(console.summary(
      {k: result[k] for k in ("top1", "top5", "videos", "views") if k in result},
      tokens_kept={"train, after mixing": summary.get("tokens_kept_fraction"),
                   "final" if config.data.final else "val": result["tokens_kept_mean"]
                   / result["tokens_total"] if "tokens_kept_mean" in result else None},
      wall_time_s=time.perf_counter() - start_time, workdir=workdir, model_dir=model_dir,
      checkpoint_dir=manager.directory, tensorboard_dir=os.path.join(workdir, "tensorboard"),
      labels=_classes_file(config.data.train)))
  return result


def _train_shapes(config, spec: vit.ModelSpec, train_step: TrainStep, iterator, mesh,
                  rng: jax.Array) -> layout.ShapeSet:
  """The run's static train shapes (at most config.layout.shapes), chosen before the first
  step from the exact kept counts of the run's first batches: phase 1 as those steps run it,
  so after mixing and erasing. The iterator is put back where it was."""
  initial = iterator.get_state()
  samples = [train_step.begin(rng, i, sharding.global_batch(mesh, next(iterator))).host_counts()
             for i in range(config.layout.calibration_batches)]
  iterator.set_state(initial)
  return layout.choose_shapes(samples, train_step.layout, num_tokens=spec.num_tokens,
                              groups=train_step.groups, micro_batches=config.grad_accum_steps,
                              max_shapes=config.layout.shapes, width=spec.width,
                              mlp_dim=spec.mlp_dim)


def _compile_shapes(train_step: TrainStep, state, pending: two_phase.Pending) -> None:
  """Compile every train shape before the first step, so no step waits for a compilation."""
  plans = train_step.shapes.plans
  shapes = f"{len(plans)} train shape{'s' if len(plans) != 1 else ''}"
  console.say(f"compiling {shapes} (stream slots × row slots per group: "
              + ", ".join(f"{p.length}×{p.capacity}" for p in plans) + ")")
  start = time.perf_counter()
  for p in plans:
    train_step.driver.compile(p, state, pending.outputs)
  console.say(f"compiled {shapes} in {time.perf_counter() - start:.1f} s")


def _classes_file(patterns: str) -> str | None:
  path = os.path.join(os.path.dirname(str(input_pipeline.open_source(patterns).shards[0])),
                      "classes.txt")
  return path if os.path.exists(path) else None


class DataError(RuntimeError):
  """Too many bad records or labels to trust the data."""


class _DataCheck:
  """Host-side checks of each local batch before it is used: labels outside [0, classes) are
  counted and weighted out (or stop the run when strict); too many bad records in the last
  ~20 batches stop the run, so an unreadable dataset never "trains" to the end."""

  def __init__(self, num_classes: int, max_bad_fraction: float, strict: bool):
    self.num_classes, self.limit, self.strict = num_classes, max_bad_fraction, strict
    self.recent: list[tuple[int, int]] = []
    self.bad_labels = self.bad_records = self.seen = 0

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    label, valid = batch["label"], batch["valid"].astype(bool)
    outside = valid & ((label < 0) | (label >= self.num_classes))
    if outside.any():
      if self.strict:
        raise DataError(f"labels {sorted(set(label[outside].tolist()))[:5]} are outside "
                        f"[0, {self.num_classes}) (config.data.strict)")
      self.bad_labels += int(outside.sum())
      batch = dict(batch, valid=valid & ~outside, label=np.where(outside, 0, label))
    errors = int(batch["error"].sum())
    self.bad_records += errors
    self.seen += len(label)
    self.recent = (self.recent + [(errors + int(outside.sum()), len(label))])[-20:]
    bad, seen = map(sum, zip(*self.recent))
    if seen >= 4 * len(label) and bad > self.limit * seen:
      raise DataError(f"{bad} of the last {seen} training records are unreadable or mislabelled "
                      f"(limit config.data.max_bad_fraction={self.limit}); the log names them")
    return batch

  def finish(self) -> None:
    """At the end of a run too short for the rolling check: the whole run's share."""
    bad = self.bad_records + self.bad_labels
    if self.seen and bad > self.limit * self.seen:
      raise DataError(f"{bad} of the {self.seen} training records read were unreadable or "
                      f"mislabelled (limit config.data.max_bad_fraction={self.limit}); the "
                      "log names them. The model was not exported")

  def totals(self) -> dict[str, int]:
    return {"bad_records": self.bad_records, "bad_labels": self.bad_labels}


def _stop_if_not_finite(state, manager, *, check_state: bool = False) -> None:
  """Stops the run if a step was skipped for a non-finite loss, gradient or update (or, with
  `check_state`, before a save, if any value of the state is not finite): nothing non-finite
  is ever saved, so the last checkpoint named is a good one."""
  bad = int(jax.device_get(state["bad_step"]))
  if bad < 0 and check_state and not bool(checkpoint.all_finite(state)):
    bad = int(jax.device_get(state["step"]))
  if bad >= 0:
    manager.wait()
    last = manager.latest_step()
    raise NonFiniteLossError(
        f"the loss, gradients or updates became non-finite at step {bad}; stopped without "
        f"saving. The last good checkpoint is step {last} in {manager.directory}"
        if last is not None else
        f"the loss, gradients or updates became non-finite at step {bad}; stopped (no "
        "checkpoint was saved yet)")


def _summarise(metrics: list[dict[str, np.ndarray]], seconds: float, steps: int,
               num_tokens: int) -> dict[str, float]:
  mean = lambda k: float(np.mean([m[k] for m in metrics]))
  clips = float(np.sum([m["clips"] for m in metrics]))
  return {"loss": mean("loss"), "accuracy": mean("accuracy"), "lr": float(metrics[-1]["lr"]),
          "grad_norm": mean("grad_norm"), "tokens_kept": mean("tokens_kept"),
          "tokens_kept_fraction": mean("tokens_kept") / num_tokens,
          "slots_per_clip": float(np.sum([m["slots"] for m in metrics])) / max(clips, 1.0),
          "clips_per_s": clips / seconds, "step_time_s": seconds / steps,
          "losses": [float(m["loss"]) for m in metrics]}


def _metric_line(step: int, total: int, v: dict[str, float]) -> str:
  extra = "".join(f" | {int(v[k])} {k.replace('_', ' ')} skipped"
                  for k in ("bad_records", "bad_labels") if v.get(k))
  return (f"step {step}/{total} | loss {v['loss']:.4f} | acc {v['accuracy']:.1%} | "
          f"lr {v['lr']:.2e} | grad {v['grad_norm']:.3f} | tokens kept "
          f"{v['tokens_kept_fraction']:.1%} | {v['clips_per_s']:.1f} clips/s | "
          f"{v['step_time_s']:.3f} s/step{extra}")


def _evaluate(config, evaluator, spec, params, split, step, log, workdir, bar=None
              ) -> dict[str, Any]:
  views = config.data.val_views if split == "val" else config.data.final_views
  batches = evaluate.make_batches(config.data[split], sampling(config, spec, views),
                                  config.eval_batch_size // jax.process_count(),
                                  workers=config.data.workers, strict=config.data.strict,
                                  prefetch=config.data.prefetch)
  num_records = input_pipeline.num_examples(config.data[split])
  metrics = evaluator(params, batches, num_records=num_records, num_classes=spec.num_classes,
                      description=f"{split} {views} @ {step}",
                      sort_window=config.data.sort_window)
  name = f"{split}_{views}_step{step}"
  evaluate.write_report(metrics, os.path.join(workdir, f"{name}.json"),
                        input_pipeline.read_classes(config.data[split]))
  log.write(step, {f"{split}_{views}/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float))})
  line = (f"{split} ({views} views) @ step {step}: top-1 {metrics['top1']:.2%}, top-5 "
          f"{metrics['top5']:.2%} over {metrics['videos']} videos ({metrics['views']} views); "
          f"tokens kept {metrics['tokens_kept_mean']:.0f}/{metrics['tokens_total']}; "
          f"{metrics['clips_per_s']:.1f} clips/s")
  (bar.write if bar is not None else console.say)(line)
  return metrics


def run_eval(config, workdir, mesh, spec) -> dict[str, Any]:
  """Evaluate `init_from` on data.final (else data.val) under the config's token policy."""
  model = build_model(config, spec, train=False)
  _, params = checkpoint.load_model(config.init_from)
  params = vit.arrange_blocks(params, scans(config))
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  checkpoint.check_params(params, abstract, config.init_from)
  params = jax.device_put(params, sharding.tree_shardings(mesh, abstract))
  split = "final" if config.data.final else "val"
  log = _Log(workdir)
  evaluator = evaluate.Evaluator(model, policy(config), token_layout(config), mesh)
  try:
    return _evaluate(config, evaluator, spec, params, split, 0, log, workdir)
  finally:
    log.close()
