"""A saved model: `params/` (an orbax checkpoint of the parameter tree) and `model.json`
(the architecture), so evaluation, fine-tuning and prediction can rebuild it by itself.

Directories are written under a temporary name beside the target and renamed when complete:
a crash never leaves a half-written model under the final name.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlt_jax.models import vit

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
ARCHITECTURE_FIELDS = ("num_classes", "width", "depth", "num_heads", "mlp_dim", "patch_size",
                       "tubelet_size", "num_frames", "image_size", "length_embedding")


def save_model(directory: str | os.PathLike, params: Any, model_config: dict[str, Any]) -> None:
  """Writes params and model.json to `directory`, which must not exist yet."""
  target = pathlib.Path(directory).absolute()
  if target.exists():
    raise FileExistsError(f"{target} already exists; choose a new output directory")
  missing = [f for f in ARCHITECTURE_FIELDS if f not in model_config]
  if missing:
    raise ValueError(f"model config lacks {missing}")
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  umask = os.umask(0)
  os.umask(umask)
  staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a model directory is not
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, params))
    checkpointer.wait_until_finished()
    (staging / MODEL_JSON).write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    staging.rename(target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def load_model(directory: str | os.PathLike) -> tuple[dict[str, Any], Any]:
  """(model config, params as numpy arrays) of a directory written by `save_model`."""
  root = pathlib.Path(directory).absolute()
  config_file = root / MODEL_JSON
  if not config_file.is_file() or not (root / PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{root}: not a saved rlt_jax model (expected {MODEL_JSON} and "
                            f"{PARAMS_DIR}/, as written by python -m rlt_jax.convert)")
  config = json.loads(config_file.read_text())
  params = ocp.StandardCheckpointer().restore(root / PARAMS_DIR)
  return config, jax.tree_util.tree_map(np.asarray, params)


def build_model(config: dict[str, Any], **overrides) -> vit.VisionTransformer:
  """The VisionTransformer a model config describes, with run-time fields overridden
  (tokenizer, dtype, attention, dropout…)."""
  fields = {k: config[k] for k in ARCHITECTURE_FIELDS if k in config} | overrides
  return vit.VisionTransformer(**fields)


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / MODEL_JSON
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise FileNotFoundError(f"{path}: cannot read the model config ({e})") from None


def model_config(model: vit.VisionTransformer) -> dict[str, Any]:
  return {f: getattr(model, f) for f in ARCHITECTURE_FIELDS}


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


def export_model(directory: str | os.PathLike, params: Any, config: dict[str, Any]) -> None:
  """Writes a model directory from every process (params may be sharded across hosts); an
  earlier export is replaced only once the new one is complete."""
  from jax.experimental import multihost_utils
  target = pathlib.Path(directory).absolute()
  fresh, old = target.parent / f".{target.name}.new", target.parent / f".{target.name}.old"
  main = jax.process_index() == 0
  if main:
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
  multihost_utils.sync_global_devices("export_model:start")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(fresh / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  if main:
    (fresh / MODEL_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if target.exists():
      shutil.rmtree(old, ignore_errors=True)
      target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)
  multihost_utils.sync_global_devices("export_model:done")


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

  def save(self, step: int, state: Any, iterator: Any, force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=self._grain.checkpoint.CheckpointSave(iterator)),
        force=force)

  def restore(self, step: int, abstract_state: Any, shardings: Any, iterator: Any):
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=self._grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()
