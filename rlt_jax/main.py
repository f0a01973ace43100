"""Train or evaluate: `python -m rlt_jax.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden on the command line (`--config.rlt.threshold=0.05`,
`--config.batch_size=64`). The same command runs on one CPU, one GPU, or on every host of a
TPU pod slice / GPU cluster: with several processes JAX's distributed runtime is started first
(auto-detected on Cloud TPU and SLURM, or given with --coordinator_address, --num_processes,
--process_id). A workdir that holds checkpoints is resumed from its latest one.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "a config file in configs/", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and reports go here")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
flags.DEFINE_integer("process_id", None, "this process's id (multi-process)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _multi_process_environment() -> bool:
  """Cloud TPU slices with several workers and multi-task SLURM jobs start distributed JAX."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def main(argv: list[str]) -> None:
  del argv
  import jax
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _multi_process_environment():
    jax.distributed.initialize()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  from rlt_jax import train
  try:
    train.run(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
