"""One run in a workdir: the checks, the workdir's lock and log, then training or evaluation.

Nothing is written before the config and the workdir pass their checks and the workdir is
locked, so a refused run leaves nothing behind and a refused second run touches nothing of
the first one's. `python -m rlt_jax.main` calls `run`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections

from rlt_jax.data import synthetic
from rlt_jax.runtime import console, files, sharding
from rlt_jax.training import configure, evaluate, train


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or, with mode='eval', evaluate) as the config says; returns the final metrics.

  Nothing is written before the config and the workdir pass their checks and the workdir is
  locked: a refused run leaves nothing behind, and a refused second run touches nothing of
  the first one's.
  """
  spec = configure.check(config)
  workdir = str(files.prepare_workdir(workdir))
  lock = files.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    console.log_to_file(workdir)
    if jax.process_index() == 0:
      files.remove_stale_temporaries(workdir)  # left by a run killed while writing
    if config.data.synthetic_dir and jax.process_index() == 0:
      write_synthetic(config)
    if config.data.synthetic_dir and jax.process_count() > 1:
      multihost_utils.sync_global_devices("synthetic dataset written")
    mesh = sharding.make_mesh(**config.mesh)
    if config.mode == "eval":
      return evaluate.run(config, workdir, mesh, spec)
    return train.train(config, workdir, mesh, spec)


def write_synthetic(config: ml_collections.ConfigDict) -> None:
  """Writes the synthetic dataset data.synthetic_dir names (the demo's data), unless it holds
  it already: a step of the run, after the config and workdir were checked."""
  try:
    synthetic.generate(config.data.synthetic_dir, size=config.data.synthetic_size,
                       num_frames=config.data.synthetic_frames)
  except (FileExistsError, ValueError) as e:
    raise configure.ConfigError(f"config.data.synthetic_dir: {e}") from None
