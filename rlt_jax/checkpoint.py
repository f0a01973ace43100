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
