"""The train step and the training loop: clips → normalise, mix, erase, RLT, ViT → loss → AdamW.

Read top to bottom: build the model, the data and the optimizer; fix the run's static shapes
from its first batches and compile them; restore the latest checkpoint if the workdir has one;
then step. Each step runs in two phases (`TrainStep`, through `two_phase.TwoPhase`): the device
computes every clip's exact kept count, the host picks the static token layout from them, and
the update compiled for that layout runs; phase 1 of the next step is dispatched before this
step's update, so the host plans while the device works. Other waits come at logging,
checkpoint and evaluation intervals. A resumed run (after SIGTERM, SIGKILL or a crash) restores
parameters, optimizer state, step, RNG and the data iterator, and continues with exactly the
batches and losses of an uninterrupted run. `run.run` checks the config and the workdir first.
"""

from __future__ import annotations

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

from rlt_jax import layout, rlt
from rlt_jax.checkpoints import checkpoint
from rlt_jax.data import input_pipeline
from rlt_jax.models import vit
from rlt_jax.runtime import console, sharding
from rlt_jax.training import augment, configure, evaluate, optim, two_phase


class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- the step

class TrainStep:
  """state, global batch → state, metrics, in two phases around a host plan.

  Phase 1 (`prepare`): normalise, mix, erase, apply the token policy (on the mixed clips, as
  the release does, or with `mask_before_mix` on each source clip, carried through the mixing:
  `augment.carry_mask`; the counts of both rules go to the metrics); the exact kept counts
  come to the host, which picks the static token layout: the exact plan of those counts, or
  the cheapest of a fixed `layout.ShapeSet` (`use_shapes`) that holds them. Phase 2 (`update`,
  compiled once per plan): tokenise, forward, backward, AdamW. Non-finite losses skip the
  update and are recorded. Both phases run through the shared `two_phase.TwoPhase` driver;
  `begin` (phase 1 of a step) may be called before `finish` of the previous step.
  """

  def __init__(self, model: vit.VisionTransformer, tx, lr_schedule, aug: augment.Augment,
               token_policy: rlt.Policy, token_layout: layout.Layout, accum_steps: int,
               mesh: jax.sharding.Mesh, state_shardings: Any = None,
               mask_before_mix: bool = False):
    self.model, self.tx, self.lr_schedule, self.aug = model, tx, lr_schedule, aug
    self.mask_before_mix = mask_before_mix
    self.policy, self.layout, self.accum = token_policy, token_layout, accum_steps
    self.mesh, self.groups = mesh, sharding.batch_shards(mesh)
    self.shapes: layout.ShapeSet | None = None
    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    self.driver = two_phase.TwoPhase(
        self.prepare, self.update, self._plan, mesh=mesh,
        first_shardings=({"frames": batch, "targets": batch, "mask": batch, "weights": batch,
                          "label": batch, "kept_mask_before_mix": batch,
                          "kept_mask_after_mix": batch}, replicated),
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
    select = lambda x: rlt.select(x, self.policy, tubelet_size=spec.tubelet_size,
                                  patch_size=spec.patch_size, rng=token_key,
                                  valid=batch["valid"])
    frames = rlt.normalize(batch["frames"])
    frames, targets, after, before = augment.augment_and_mask(
        aug_key, erase_key, frames, batch["label"], self.aug, select,
        rlt.token_grid(frames.shape, spec.tubelet_size, spec.patch_size),
        patch_size=spec.patch_size, carry=self.policy.kind == "rlt")  # others ignore pixels
    mask = before if self.mask_before_mix else after
    # the patch embedding casts its input to the model's dtype: casting here halves phase 2's
    # input (bf16) and changes nothing; the mask was decided on float32 values
    prepared = {"frames": frames.astype(self.model.dtype), "targets": targets, "mask": mask,
                "weights": batch["valid"].astype(jnp.float32), "label": batch["label"],
                "kept_mask_before_mix": before.sum(-1, dtype=jnp.int32),
                "kept_mask_after_mix": after.sum(-1, dtype=jnp.int32)}
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
    mean = lambda kept: jnp.sum(kept.astype(jnp.float32) * weights) / count
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_schedule(step),
               "accuracy": jnp.sum(correct * weights) / count,
               "tokens_kept": mean(mask.sum(-1)), "clips": weights.sum(),
               "tokens_kept_mask_before_mix": mean(prepared["kept_mask_before_mix"]),
               "tokens_kept_mask_after_mix": mean(prepared["kept_mask_after_mix"]),
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


# ----------------------------------------------------------------------------- the loop

def train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
          spec: vit.ModelSpec) -> dict[str, Any]:
  """Trains as the config says in a checked, locked workdir; returns the final metrics."""
  manager = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints"),
                                        keep=config.keep_checkpoints)
  try:  # closed however the run ends: orbax's threads must not outlive it
    return _train(config, workdir, mesh, spec, manager)
  finally:
    manager.close()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           spec: vit.ModelSpec, manager: checkpoint.TrainCheckpoints) -> dict[str, Any]:
  # ----------------------------------------------------------------- model, data, optimizer
  model = configure.build_model(config, spec, train=True)
  token_policy = configure.token_policy(config)
  num_train = input_pipeline.num_examples(config.data.train)
  steps_per_epoch = max(1, num_train // config.batch_size)
  total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
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
        config.data.train, configure.sampling(config, spec), configure.clip_cost(config, spec),
        cache_dir=os.path.join(workdir, "cache"),
        process_index=jax.process_index(), process_count=jax.process_count(),
        workers=config.data.workers, strict=config.data.strict)
  dataset = input_pipeline.make_dataset(
      config.data.train, mode="train", sampling=configure.sampling(config, spec),
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
    loaded = vit.arrange_blocks(loaded, configure.scans(config))
    checkpoint.check_params(loaded, abstract_params, config.init_from)
    state = init(jax.device_put(loaded, state_shardings["params"]))
  else:
    params = jax.jit(lambda: model.init(rng, init_tokens)["params"],
                     out_shardings=state_shardings["params"])()
    state = init(params)

  # ----------------------------------------------------------------- the step and its shapes
  aug = augment.Augment(num_classes=spec.num_classes, **config.augment)
  train_step = TrainStep(model, tx, lr_schedule, aug, token_policy,
                         configure.token_layout(config), config.grad_accum_steps, mesh,
                         state_shardings, mask_before_mix=config.rlt.mask_before_mix)
  run_rng = jax.random.fold_in(rng, 1)  # the state's key: phase 1 needs nothing else of it

  iterator = iter(dataset)
  if token_policy.kind == "rlt" and config.layout.shapes:
    train_step.use_shapes(_train_shapes(config, spec, train_step, iterator, mesh, run_rng))

  # ----------------------------------------------------------------- resume
  start = manager.latest_step()
  if start is not None:
    state, iterator, start = manager.restore(abstract_state, state_shardings, iterator)
    console.say(f"resumed from step {start} ({manager.directory})")
  start = start or 0
  evaluator = evaluate.Evaluator(configure.build_model(config, spec, train=False), token_policy,
                                 configure.token_layout(config), mesh)
  log, preemption = console.MetricsLog(workdir), _Preemption()
  bar = console.progress(total_steps, start, "train")
  data_check = input_pipeline.BatchCheck(spec.num_classes, config.data.max_bad_fraction,
                                         config.data.strict)
  data_states: dict[int, Any] = {}  # step → the iterator's state before that step's batch

  def begin(step: int) -> two_phase.Pending:
    """Phase 1 of `step`, dispatched (its batch read, checked and sent to the devices)."""
    data_states[step] = iterator.get_state()
    return train_step.begin(run_rng, step, sharding.global_batch(mesh, data_check(
        next(iterator))))

  def iterator_state(step: int) -> Any:
    return data_states.pop(step) if step in data_states else iterator.get_state()

  # ----------------------------------------------------------------- the loop
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
        result = evaluate.split(config, evaluator, spec, state["params"], "val", done, log,
                                workdir, bar)
    bar.close()
    data_check.finish()
    if config.data.final:
      result = evaluate.split(config, evaluator, spec, state["params"], "final", total_steps,
                              log, workdir, bar)
    checkpoint.save_model(model_dir, state["params"], spec, overwrite=True)
  finally:
    bar.close()
    manager.wait()  # the last checkpoint written before the summary says so
    preemption.restore()
    log.close()
  console.say(console.summary(
      {k: result[k] for k in ("top1", "top5", "videos", "views") if k in result},
      tokens_kept=_kept_shares(train_step, summary, result, "final" if config.data.final
                               else "val"),
      wall_time_s=time.perf_counter() - start_time, workdir=workdir, model_dir=model_dir,
      checkpoint_dir=manager.directory, tensorboard_dir=os.path.join(workdir, "tensorboard"),
      labels=_labels(config.data.train)))
  return result


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


def _labels(patterns: str) -> str | None:
  path = input_pipeline.classes_path(patterns)
  return str(path) if path else None


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


def _kept_shares(step: TrainStep, summary: dict, result: dict, split: str
                 ) -> dict[str, float | None]:
  """The summary's kept shares: in training under the rule the step used (and, where the step
  mixes or erases, under the other rule too), then in the evaluation of `split`."""
  used, other = ("before", "after") if step.mask_before_mix else ("after", "before")
  if step.aug.changes_clips:
    shares = {f"train, mask {used} mixing": summary.get(f"kept_fraction_mask_{used}_mix"),
              f"train, mask {other} mixing (not used)": summary.get(
                  f"kept_fraction_mask_{other}_mix")}
  else:  # nothing mixed: both rules give the same mask
    shares = {"train": summary.get("tokens_kept_fraction")}
  shares[split] = (result["tokens_kept_mean"] / result["tokens_total"]
                   if "tokens_kept_mean" in result else None)
  return shares


def _summarise(metrics: list[dict[str, np.ndarray]], seconds: float, steps: int,
               num_tokens: int) -> dict[str, float]:
  mean = lambda k: float(np.mean([m[k] for m in metrics]))
  clips = float(np.sum([m["clips"] for m in metrics]))
  return {"loss": mean("loss"), "accuracy": mean("accuracy"), "lr": float(metrics[-1]["lr"]),
          "grad_norm": mean("grad_norm"), "tokens_kept": mean("tokens_kept"),
          "tokens_kept_fraction": mean("tokens_kept") / num_tokens,
          # the share each rule keeps, whichever the step used (config rlt.mask_before_mix)
          "kept_fraction_mask_before_mix": mean("tokens_kept_mask_before_mix") / num_tokens,
          "kept_fraction_mask_after_mix": mean("tokens_kept_mask_after_mix") / num_tokens,
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
