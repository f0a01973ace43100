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

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rlt_jax import files
from rlt_jax.models import vit

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_model(directory: str | os.PathLike, params: Any, spec: vit.ModelSpec | dict[str, Any],
               *, overwrite: bool = False) -> None:
  """Writes params and model.json (the `ModelSpec`) to `directory`; called by every process.

  The directory appears complete or not at all: everything is written to a fresh staging
  directory beside it and renamed. Params may be sharded across processes (each writes its
  shards). An existing directory is an error unless `overwrite` (then replaced atomically).
  """
  from jax.experimental import multihost_utils
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
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
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


class TrainCheckpoints:
  """Orbax CheckpointManager of the train state (params, optimizer, step, RNG) and the grain
  iterator's state (one JSON per process), saved asynchronously, the last `keep` kept. A
  checkpoint becomes visible only once complete (orbax commits by rename)."""

  def __init__(self, directory: str, *, keep: int):
    import grain
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                        enable_async_checkpointing=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})
    self._grain = grain

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, iterator_state: dict[str, Any],
           force: bool = False) -> None:
    """Saves `state` and the data iterator's state before step `step`'s batch (the trainer
    reads a batch ahead, so it passes the state it captured then, not the current one)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=self._grain.checkpoint.CheckpointSave(_IteratorState(iterator_state))),
        force=force)

  def restore(self, abstract_state: Any, shardings: Any, iterator: Any):
    """(state, iterator, step) of the newest checkpoint that restores; damaged newer ones are
    skipped with a warning that says why (an earlier intact one is better than no resume)."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        shardings)
    problems = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=self._grain.checkpoint.CheckpointRestore(iterator)))
      except Exception as e:  # missing files, bad metadata, truncated arrays …
        problems.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
        logging.warning("checkpoint %s/%d cannot be restored, trying an earlier one: %s",
                        self.directory, step, e)
        continue
      return restored["state"], restored["data"], step
    raise RuntimeError(f"no checkpoint in {self.directory} can be restored: "
                       + "; ".join(problems) + ". A changed model (config.model, model.scan "
                       "included) cannot resume them; move the directory away to start afresh.")

  def wait(self) -> None:
    self._manager.wait_until_finished()
