"""A saved model: `params/` (an orbax checkpoint of the parameter tree) and `model.json`
(its `ModelSpec`), so evaluation, fine-tuning and prediction rebuild it by itself; and the
training checkpoints (state + data iterator), restored from the newest intact one.

Directories are written under a fresh temporary name beside the target and renamed when
complete: a crash never leaves a half-written model under the final name.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rlt_jax.models import vit
from rlt_jax.runtime import files

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_model(directory: str | os.PathLike, params: Any, spec: vit.ModelSpec | dict[str, Any],
               *, overwrite: bool = False) -> None:
  """Writes params and model.json (the `ModelSpec`) to `directory`; called by every process.

  The directory appears complete or not at all: everything is written to a fresh staging
  directory beside it and renamed. Params may be sharded across processes (each writes its
  shards). An existing directory is an error unless `overwrite` (then replaced atomically).
  """
  spec = spec if isinstance(spec, vit.ModelSpec) else vit.ModelSpec.from_dict(spec)
  params = vit.arrange_blocks(params, scan=False)  # the saved format: one blocks_i per block
  target = pathlib.Path(directory).absolute()
  main = jax.process_index() == 0
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} already exists; choose a new output directory")
  target.parent.mkdir(parents=True, exist_ok=True)
  token = secrets.randbits(62) if main else 0
  if jax.process_count() > 1:
    token = int(multihost_utils.broadcast_one_to_all(np.int64(token)))
  staging = target.parent / f".{target.name}.{token:x}.tmp"
  try:
    if main:
      staging.mkdir()  # exclusive: fails if the name exists
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("save_model:staging")
    _write_params(staging / PARAMS_DIR, params)
    if main:
      with files.atomic_write(staging / MODEL_JSON) as f:
        f.write(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
      files.publish_directory(staging, target)
  except BaseException:
    if main:
      shutil.rmtree(staging, ignore_errors=True)
    raise
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("save_model:done")


def _write_params(directory: pathlib.Path, params: Any) -> None:
  """The parameter tree as an orbax checkpoint at `directory` (every process writes its
  shards)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, params)
  checkpointer.wait_until_finished()
  checkpointer.close()


def read_spec(directory: str | os.PathLike) -> vit.ModelSpec:
  """The architecture saved in a model directory; a clear error for anything else."""
  path = pathlib.Path(directory) / MODEL_JSON
  if not path.is_file() or not (pathlib.Path(directory) / PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{pathlib.Path(directory).absolute()}: not a saved rlt_jax model "
                            f"(expected {MODEL_JSON} and {PARAMS_DIR}/, as written by "
                            "python -m rlt_jax.convert or a finished training)")
  try:
    fields = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable model config ({e})") from None
  return vit.ModelSpec.from_dict(fields, str(path))


def load_model(directory: str | os.PathLike) -> tuple[vit.ModelSpec, Any]:
  """(spec, params as numpy arrays) of a model directory; params are checked against the spec."""
  spec = read_spec(directory)
  root = pathlib.Path(directory).absolute()
  try:
    params = ocp.StandardCheckpointer().restore(root / PARAMS_DIR)
  except Exception as e:  # orbax raises many types for damaged directories
    raise ValueError(f"{root / PARAMS_DIR}: cannot restore the parameters "
                     f"({type(e).__name__}: {e})") from None
  params = jax.tree_util.tree_map(np.asarray, params)
  check_params(params, abstract_params(spec), str(root))
  return spec, params


def abstract_params(spec: vit.ModelSpec) -> Any:
  """Shapes and dtypes of a model's parameters, without computing them."""
  return jax.eval_shape(
      lambda: vit.build(spec).init(jax.random.PRNGKey(0), vit.example_tokens(spec))["params"])


def check_params(params: Any, expected: Any, source: str) -> None:
  """Raises ValueError listing every parameter whose presence or shape differs."""
  flat = lambda t: {jax.tree_util.keystr(k): tuple(v.shape)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  got, want = flat(params), flat(expected)
  problems = [f"missing {k} {want[k]}" for k in want if k not in got]
  problems += [f"unexpected {k} {got[k]}" for k in got if k not in want]
  problems += [f"{k}: {got[k]} where the model has {want[k]}" for k in want
               if k in got and got[k] != want[k]]
  if problems:
    raise ValueError(f"{source}: parameters do not fit the model: " + "; ".join(problems))


class _IteratorState:
  """A data iterator's state captured earlier, in the form grain's checkpoint handler saves
  (it calls `get_state()` of anything that is not a grain iterator and expects bytes)."""

  def __init__(self, state: dict[str, Any]):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()


class NoRestorableCheckpoint(RuntimeError):
  """Every training checkpoint in a workdir is damaged or does not fit the model."""


@jax.jit
def fingerprint(tree: Any) -> jax.Array:
  """Two 32-bit sums per array of its bits, each bit pattern weighted by its position:
  any changed value changes them (but with a chance of about 2^-64). Integer arithmetic that
  wraps, so the result does not depend on sharding or summation order. (arrays, 2) uint32."""
  sums = []
  for x in jax.tree_util.tree_leaves(tree):
    x = jnp.asarray(x)
    if x.dtype.itemsize == 8:
      x = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    elif x.dtype != jnp.bool_:
      x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    bits = x.reshape(-1).astype(jnp.uint32)
    i = jnp.arange(bits.size, dtype=jnp.uint32)
    first = bits * (i * jnp.uint32(2654435761) + jnp.uint32(1))
    second = (bits ^ (i * jnp.uint32(2246822519))) * (i * jnp.uint32(3266489917) | jnp.uint32(1))
    sums.append(jnp.stack([first.sum(dtype=jnp.uint32), second.sum(dtype=jnp.uint32)]))
  return jnp.stack(sums)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of a tree is finite."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
                            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
                           or [jnp.bool_(True)]))


class TrainCheckpoints:
  """Orbax CheckpointManager of the train state (params, optimizer, step, RNG), the grain
  iterator's state (one JSON per process) and the state's array checksums, saved
  asynchronously, the last `keep` kept. A checkpoint becomes visible only once complete
  (orbax commits by rename); on restore its arrays must match their checksums and be finite,
  or an earlier checkpoint is used."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                        enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, iterator_state: dict[str, Any],
           force: bool = False) -> None:
    """Saves `state`, its checksums and the data iterator's state before step `step`'s batch
    (the trainer reads a batch ahead, so it passes the state it captured then)."""
    sums = np.asarray(jax.device_get(fingerprint(state)), np.uint32).tolist()
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_IteratorState(iterator_state)),
        checksums=ocp.args.JsonSave({"fingerprint": sums})), force=force)

  def restore(self, abstract_state: Any, shardings: Any, iterator: Any):
    """(state, iterator, step) of the newest checkpoint that restores intact; damaged newer
    ones are skipped with a warning that says why (an earlier intact one is better than no
    resume). Raises NoRestorableCheckpoint, touching nothing, if none does."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        shardings)
    problems = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(iterator)))
        problem = self._damage(step, restored["state"])
      except Exception as e:  # missing files, bad metadata, truncated arrays …
        problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
      if problem is None:
        if problems:
          logging.warning("resuming from checkpoint %s/%d, the newest intact one (%s)",
                          self.directory, step, "; ".join(problems))
        return restored["state"], restored["data"], step
      problems.append(f"step {step}: {problem}")
      logging.info("checkpoint %s/%d cannot be used, trying an earlier one: %s",
                   self.directory, step, problem)
    raise NoRestorableCheckpoint(
        f"no checkpoint in {self.directory} can be restored ({'; '.join(problems)}); they are "
        "left as they are. A changed model (config.model, model.scan included) cannot resume "
        "them; move the directory away to start afresh")

  def _damage(self, step: int, state: Any) -> str | None:
    """Why a restored state must not be used, or None: checksums that differ, or values that
    are not finite (a checkpoint written before either check existed has no checksums)."""
    if os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
      saved = self._manager.restore(step, args=ocp.args.Composite(
          checksums=ocp.args.JsonRestore()))["checksums"]["fingerprint"]
      got = np.asarray(jax.device_get(fingerprint(state)), np.uint32).tolist()
      if got != saved:
        bad = sum(a != b for a, b in zip(got, saved))
        return f"{bad} of its {len(saved)} arrays differ from their checksums (damaged data)"
    if not bool(all_finite(state)):
      return "it holds values that are not finite"
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and stops orbax's background work (call once, at the end)."""
    self._manager.wait_until_finished()
    self._manager.close()
