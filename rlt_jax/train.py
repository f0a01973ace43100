"""The training loop: data → (device) normalise, augment, RLT, ViT → loss → AdamW, on a mesh.

Read top to bottom: check the config, build mesh, model, data and optimizer, restore the latest
checkpoint if the workdir has one, then step. The host only waits on the device at logging,
checkpoint and evaluation intervals. A resumed run (after SIGTERM, SIGKILL or a crash) restores
parameters, optimizer state, step, RNG and the data iterator, and continues with exactly the
batches and losses of an uninterrupted run.
"""

from __future__ import annotations

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
from absl import logging

from rlt_jax import (augment, checkpoint, evaluate, input_pipeline, optim, rlt, sharding,
                     synthetic)
from rlt_jax.models import vit


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is compiled."""


class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- setup

def tokenizer_config(config: ml_collections.ConfigDict) -> rlt.TokenizerConfig:
  r = config.rlt
  return rlt.TokenizerConfig(policy=r.policy, threshold=r.threshold, keep_fraction=r.keep_fraction,
                             capacity=r.capacity or None, packing=r.packing,
                             row_length=r.row_length or None, num_rows=r.num_rows or None,
                             overflow=r.overflow)


def build_model(config: ml_collections.ConfigDict, *, train: bool) -> vit.VisionTransformer:
  """The ViT the config names, or the architecture of `init_from`'s model.json."""
  m = config.model
  runtime = dict(dtype=vit.DTYPES[m.dtype], attention=m.attention, remat=m.remat,
                 dropout=m.dropout if train else 0.0, drop_path=m.drop_path if train else 0.0,
                 head_dropout=m.head_dropout if train else 0.0)
  if config.init_from:
    saved = checkpoint.read_model_config(config.init_from)
    model = checkpoint.build_model(saved, **runtime)
  else:
    shape = {k: m[k] for k in ("patch_size", "tubelet_size", "num_frames", "image_size", "width",
                               "depth", "num_heads", "mlp_dim") if m.get(k)}
    model = vit.build(m.variant, num_classes=m.num_classes, length_embedding=m.length_embedding,
                      **shape, **runtime)
  return model.clone(tokenizer=tokenizer_config(config))


def sampling(config: ml_collections.ConfigDict, model: vit.VisionTransformer,
             with_kept: bool) -> input_pipeline.Sampling:
  d = config.data
  return input_pipeline.Sampling(
      num_frames=model.num_frames, stride=d.stride, source_fps=d.source_fps or None,
      image_size=model.image_size, flip=d.flip, min_area=d.min_area,
      test_clips=d.test_clips, test_crops=d.test_crops, tubelet_size=model.tubelet_size,
      patch_size=model.patch_size,
      host_rlt_threshold=config.rlt.threshold if with_kept and config.rlt.policy == "rlt"
      else None)


def check(config: ml_collections.ConfigDict) -> None:
  """Every mistake we can see without compiling: names, divisibility, files."""
  if config.mode not in ("train", "eval"):
    raise ConfigError(f"config.mode={config.mode!r}: expected 'train' or 'eval'")
  if config.model.variant not in vit.VARIANTS:
    raise ConfigError(f"config.model.variant={config.model.variant!r}: expected one of "
                      f"{sorted(vit.VARIANTS)}")
  if config.model.dtype not in vit.DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected one of "
                      f"{sorted(vit.DTYPES)}")
  try:
    tokenizer_config(config)
  except ValueError as e:
    raise ConfigError(f"config.rlt: {e}") from None
  if config.data.synthetic_dir:
    synthetic.generate(config.data.synthetic_dir, seed=config.data.get("synthetic_seed", 0))
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
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  splits = (["train"] if config.mode == "train" else []) + [
      s for s in ("val", "test") if config.data[s]]
  for split in splits:
    try:
      input_pipeline.list_shards(config.data[split])
    except FileNotFoundError as e:
      raise ConfigError(f"config.data.{split}: {e}") from None
  if config.mode == "eval" and not config.init_from:
    raise ConfigError("config.mode='eval' needs config.init_from (a converted model directory "
                      "or a training workdir's exported model)")
  if config.init_from and not os.path.isfile(os.path.join(config.init_from,
                                                          checkpoint.MODEL_JSON)):
    raise ConfigError(f"config.init_from={config.init_from!r}: not a saved rlt_jax model "
                      f"(expected {checkpoint.MODEL_JSON}; convert .pth files with "
                      f"python -m rlt_jax.convert)")


# ----------------------------------------------------------------------------- the step

def make_train_step(model: vit.VisionTransformer, tx, lr_schedule, aug: augment.Augment,
                    accum_steps: int):
  """state, global batch → state, metrics. Non-finite losses skip the update and are recorded."""

  def loss_fn(params, frames, targets, weights, rng):
    dropout_key, tokens_key = jax.random.split(rng)
    out = model.apply({"params": params}, frames, train=True,
                      rngs={"dropout": dropout_key, "tokens": tokens_key})
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
    return -jnp.sum(jnp.sum(targets * logp, -1) * weights), out

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state, batch):
    step, params = state["step"], state["params"]
    aug_key, erase_key, model_key = jax.random.split(jax.random.fold_in(state["rng"], step), 3)
    frames = rlt.normalize(batch["frames"])
    frames, targets = augment.mix(aug_key, frames, batch["label"], aug)
    frames = augment.erase(erase_key, frames, aug)
    weights = batch["valid"].astype(jnp.float32)
    if accum_steps == 1:
      (loss_sum, out), grads = grad_fn(params, frames, targets, weights, model_key)
      logits, kept, overflow = out.logits, out.kept, out.num_overflow
    else:  # micro-batch j = rows j, j + k, …, so every device holds part of each
      split = lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1)

      def micro(carry, xs):
        f, t, w, j = xs
        (l, o), g = grad_fn(params, f, t, w, jax.random.fold_in(model_key, j))
        carry = jax.tree_util.tree_map(jnp.add, carry, (l, g))
        return carry, (o.logits, o.kept, o.num_overflow)

      zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
      (loss_sum, grads), (logits, kept, overflow) = jax.lax.scan(
          micro, zeros, (split(frames), split(targets), split(weights),
                         jnp.arange(accum_steps)))
      unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
      logits, kept, overflow = unsplit(logits), unsplit(kept), overflow.sum()
    count = jnp.maximum(weights.sum(), 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    loss = loss_sum / count
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = jax.tree_util.tree_map(jnp.add, params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
        "step": step + 1, "rng": state["rng"],
        "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"]),
    }
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(step),
               "accuracy": jnp.sum(correct * weights) / count,
               "tokens_kept": jnp.sum(kept * weights) / count,
               "overflow": overflow, "errors": batch["error"].sum(), "clips": weights.sum()}
    return new_state, metrics

  return step_fn


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
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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
  """Train (or, with mode='eval', evaluate) as the config says; returns the final metrics."""
  check(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(**config.mesh)
  if config.mode == "eval":
    return run_eval(config, workdir, mesh)

  model = build_model(config, train=True)
  train_sampling = sampling(config, model, with_kept=False)
  local_batch = config.batch_size // jax.process_count()
  dataset = input_pipeline.make_dataset(
      config.data.train, mode="train", sampling=train_sampling, batch_size=local_batch,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      workers=config.data.workers, strict=config.data.strict)
  num_train = input_pipeline.num_examples(config.data.train)
  steps_per_epoch = max(1, num_train // config.batch_size)
  total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)

  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1, model.num_frames, model.image_size, model.image_size, 3), jnp.uint8)
  abstract_params = jax.eval_shape(
      lambda: model.init({"params": rng, "tokens": rng}, dummy)["params"])
  tx, lr_schedule = optim.make(config, abstract_params, depth=model.depth,
                               total_steps=total_steps, warmup_steps=warmup_steps)

  def init_state(params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
            "rng": jax.random.fold_in(rng, 1), "bad_step": jnp.int32(-1)}

  abstract_state = jax.eval_shape(init_state, abstract_params)
  state_shardings = sharding.tree_shardings(mesh, abstract_state)
  init = jax.jit(init_state, out_shardings=state_shardings)
  if config.init_from:
    _, loaded = checkpoint.load_model(config.init_from)
    checkpoint.check_params(loaded, abstract_params, config.init_from)
    state = init(jax.device_put(loaded, state_shardings["params"]))
  else:
    params = jax.jit(lambda: model.init({"params": rng, "tokens": rng}, dummy)["params"],
                     out_shardings=state_shardings["params"])()
    state = init(params)

  aug = augment.Augment(num_classes=model.num_classes, **config.augment)
  batch_shardings = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(model, tx, lr_schedule, aug, config.grad_accum_steps),
                       in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=0)

  manager = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints"),
                                        keep=config.keep_checkpoints)
  iterator = iter(dataset)
  start = manager.latest_step()
  if start is not None:
    state, iterator = manager.restore(start, abstract_state, state_shardings, iterator)
    logging.info("resumed from %s at step %d", manager.directory, start)
  start = start or 0
  evaluator = evaluate.Evaluator(build_model(config, train=False), mesh)
  log, preemption = _Log(workdir), _Preemption()
  pending, last_time, last_step, result = [], time.perf_counter(), start, {}
  try:
    for step in range(start, total_steps):
      if preemption.requested:
        if manager.latest_step() != step:
          manager.save(step, state, iterator, force=True)
        manager.wait()
        logging.info("SIGTERM: saved step %d in %s; exiting", step, manager.directory)
        return {"preempted_at": step}
      batch = sharding.global_batch(mesh, next(iterator))
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      done = step + 1
      log_now = done % config.log_every == 0 or done == total_steps
      save_now = done % config.checkpoint_every == 0 or done == total_steps
      if log_now or save_now:
        _stop_if_not_finite(state, manager)
      if log_now:
        now = time.perf_counter()
        values = _summarise(jax.device_get(pending), now - last_time, done - last_step,
                            model.num_tokens)
        values["epoch"] = done / steps_per_epoch
        log.write(done, values)
        _print_line(done, total_steps, values, (total_steps - done) * (now - last_time)
                    / (done - last_step))
        pending, last_time, last_step = [], now, done
      if save_now:
        manager.save(done, state, iterator)
      if config.eval_every and config.data.val and (done % config.eval_every == 0
                                                    or done == total_steps):
        result = _evaluate(config, evaluator, model, state["params"], "val", done, log, workdir)
    if config.data.test:
      result = _evaluate(config, evaluator, model, state["params"], "test", total_steps, log,
                         workdir)
    checkpoint.export_model(os.path.join(workdir, "model"), state["params"],
                            checkpoint.model_config(model))
  finally:
    manager.wait()
    preemption.restore()
    log.close()
  return result


def _stop_if_not_finite(state, manager) -> None:
  bad = int(jax.device_get(state["bad_step"]))
  if bad >= 0:
    manager.wait()
    last = manager.latest_step()
    raise NonFiniteLossError(
        f"the loss became non-finite at step {bad}; stopped without saving. The last good "
        f"checkpoint is step {last} in {manager.directory}" if last is not None else
        f"the loss became non-finite at step {bad}; stopped (no checkpoint was saved yet)")


def _summarise(metrics: list[dict[str, np.ndarray]], seconds: float, steps: int,
               num_tokens: int) -> dict[str, float]:
  mean = lambda k: float(np.mean([m[k] for m in metrics]))
  clips = float(np.sum([m["clips"] for m in metrics]))
  return {"loss": mean("loss"), "accuracy": mean("accuracy"), "lr": float(metrics[-1]["lr"]),
          "grad_norm": mean("grad_norm"), "tokens_kept": mean("tokens_kept"),
          "tokens_kept_fraction": mean("tokens_kept") / num_tokens,
          "overflow_batches": float(np.sum([m["overflow"] > 0 for m in metrics])),
          "bad_records": float(np.sum([m["errors"] for m in metrics])),
          "clips_per_s": clips / seconds, "step_time_s": seconds / steps,
          "losses": [float(m["loss"]) for m in metrics]}


def _print_line(step: int, total: int, v: dict[str, float], eta: float) -> None:
  if jax.process_index() != 0:
    return
  h, rem = divmod(int(eta), 3600)
  extra = f" | {int(v['bad_records'])} bad records skipped" if v["bad_records"] else ""
  print(f"step {step}/{total} | loss {v['loss']:.4f} | acc {v['accuracy']:.1%} | "
        f"lr {v['lr']:.2e} | grad {v['grad_norm']:.3f} | tokens kept "
        f"{v['tokens_kept_fraction']:.1%} | {v['clips_per_s']:.1f} clips/s | "
        f"{v['step_time_s']:.3f} s/step | ETA {h}:{rem // 60:02d}:{rem % 60:02d}{extra}",
        flush=True)


def _evaluate(config, evaluator, model, params, split, step, log, workdir) -> dict[str, Any]:
  mode = "val" if split == "val" else "test"
  batches = evaluate.make_batches(config.data[split], mode, sampling(config, model, True),
                                  config.eval_batch_size // jax.process_count(),
                                  workers=config.data.workers, strict=config.data.strict)
  num_records = input_pipeline.num_examples(config.data[split])
  metrics = evaluator(params, batches, num_records=num_records, num_classes=model.num_classes,
                      description=f"{split} @ {step}")
  evaluate.write_report(metrics, os.path.join(workdir, f"{split}_{step}.json"),
                        input_pipeline.read_classes(config.data[split]))
  summary = {f"{split}/{k}": v for k, v in metrics.items()
             if isinstance(v, (int, float))}
  log.write(step, summary)
  if jax.process_index() == 0:
    print(f"{split} @ step {step}: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%} "
          f"over {metrics['videos']} videos ({metrics['views']} views); tokens kept "
          f"{metrics['tokens_kept_mean']:.0f}/{metrics['tokens_total']}; "
          f"{metrics['clips_per_s']:.1f} clips/s", flush=True)
  return metrics


def run_eval(config, workdir, mesh) -> dict[str, Any]:
  """Evaluate `init_from` on the test split (else val) under the config's token policy."""
  model = build_model(config, train=False)
  _, params = checkpoint.load_model(config.init_from)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  checkpoint.check_params(params, abstract, config.init_from)
  params = jax.device_put(params, sharding.tree_shardings(mesh, abstract))
  split = "test" if config.data.test else "val"
  log = _Log(workdir)
  try:
    return _evaluate(config, evaluate.Evaluator(model, mesh), model, params, split, 0, log,
                     workdir)
  finally:
    log.close()

