"""usage: python -m rlt_jax.main --config=CONFIG.py --workdir=DIR [--config.KEY=VALUE ...]

Trains a video ViT as the config says (with Run-Length Tokenization where it enables it), or
evaluates a saved model with a config whose mode is 'eval'. A workdir that holds checkpoints is
resumed from the latest one.

  --config=FILE         a config file, e.g. configs/demo.py (a tiny ViT, minutes on a CPU)
  --config.KEY=VALUE    overrides one config field, e.g. --config.batch_size=64
                        --config.rlt.threshold=0.05 (keys are checked; typos are refused)
  --workdir=DIR         checkpoints, the exported model, TensorBoard files, metrics.jsonl,
                        and log.txt (the libraries' log lines, kept off the console)
  --verbose             show the libraries' INFO log on the console too (or --verbosity=0)
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                        several processes; auto-detected on Cloud TPU slices and SLURM

example: python -m rlt_jax.main --config=configs/demo.py --workdir=/tmp/rlt_demo
Exit status: 0 done, 1 the run failed, 2 the command or the config is wrong.
--helpfull lists every flag of every library.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import re
import shlex
import sys
import traceback
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/demo.py",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and reports go here")
flags.DEFINE_bool("verbose", False, "show the libraries' INFO log on the console")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
flags.DEFINE_integer("process_id", None, "this process's id (multi-process)")
FLAGS = flags.FLAGS
USAGE_ERROR, RUN_ERROR = 2, 1
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _fail(message: str, code: int) -> NoReturn:
  """One line and an exit status: a traceback tells a user nothing about a mistyped flag."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(code)


def config_keys(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  """Every field's dotted path, sub-configs included."""
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if isinstance(value, config_dict.ConfigDict):
      keys += config_keys(value, f"{prefix}{name}.")
  return keys


def closest(key: str, keys: list[str]) -> str | None:
  """The valid key nearest to `key`, by whole path, else by its last part (a wrong section)."""
  match = difflib.get_close_matches(key, keys, n=1)
  if match:
    return match[0]
  leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}  # the first key with that leaf
  match = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1)
  return leaves[match[0]] if match else None


def unknown_key_message(key: str, keys: list[str]) -> str:
  guess = closest(key, keys)
  hint = f" (did you mean {guess!r}?)" if guess else ""
  return f"unknown config key {key!r}{hint}"


def _config_args(argv: list[str]) -> tuple[str | None, list[str]]:
  """The --config file and the keys of the --config.KEY overrides, as written in argv."""
  path, keys = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    name, has_value, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-"):
      continue
    if name == "config":
      path = value if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
    elif name.startswith(("config.", "noconfig.")):
      keys.append(name.split(".", 1)[1])
  return path, keys


def _missing_config_message(path: str) -> str:
  directory = os.path.dirname(path)
  names = [os.path.join(directory, n) for n in os.listdir(directory or ".") if n.endswith(".py")
           ] if os.path.isdir(directory or ".") else []
  guess = difflib.get_close_matches(path, names, n=1)
  hint = f"did you mean {guess[0]!r}?" if guess else f"relative paths start at {os.getcwd()}"
  return f"config file {path!r} not found ({hint})"


def _load_config(path: str) -> config_dict.ConfigDict:
  """The config as --config names it (a second load, only to explain an error)."""
  return config_flags.config_flags.ConfigFileFlagParser("config").parse(path)


def _unknown_override(path: str | None, keys: list[str]) -> str | None:
  """The error for the first override naming no config field; None when all are fields or the
  config itself does not load (its own traceback then says where it breaks)."""
  try:
    valid = config_keys(_load_config(path))
  except Exception:  # noqa: BLE001  (any error of the user's get_config)
    return None
  unknown = [key for key in keys if key not in valid]
  return unknown_key_message(unknown[0], valid) if unknown else None


def _broken_config_message(path: str | None, error: BaseException) -> str:
  """One line for a config file that does not load: where in it, and what."""
  where = path.split(":", 1)[0] if path else "the config file"
  if isinstance(error, SyntaxError) and error.filename and error.lineno:
    return (f"config file {where!r}, line {error.lineno}: {type(error).__name__}: "
            f"{error.msg}")
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(where)]
  line = f", line {frames[-1].lineno}" if frames else ""
  return f"config file {where!r}{line}: {type(error).__name__}: {error}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with short help (exit 0) and one-line errors (exit 2)."""
  if any(arg in ("-h", "-?", "--help", "-help", "--helpshort") for arg in argv[1:]):
    print(__doc__.rstrip())
    sys.exit(0)
  if "--helpfull" in argv[1:]:
    print(__doc__ + "\n" + FLAGS.get_help())
    sys.exit(0)
  path, keys = _config_args(argv)
  if path is not None and not os.path.isfile(path.split(":", 1)[0]):
    _fail(_missing_config_message(path.split(":", 1)[0]), USAGE_ERROR)
  absl_logger = pylogging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(pylogging.ERROR)  # config_flags warns before raising; we say it once
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    message = str(e).removeprefix("flag ")
    override = re.match(r"--config\.([\w.]+)=", message)
    if isinstance(e, flags.IllegalFlagValueError) and override:
      kind = config_flags.config_path.get_type(override[1], _load_config(path))
      message = f"{message.partition(': ')[0]}: expected {_TYPE_NAMES.get(kind, kind.__name__)}"
    _fail(message, USAGE_ERROR)
  except Exception as e:  # noqa: BLE001  (an override key the config lacks, or a broken file)
    message = (_unknown_override(path, keys) if isinstance(e, (AttributeError, KeyError))
               else None)
    _fail(message or _broken_config_message(path, e), USAGE_ERROR)
  finally:
    absl_logger.setLevel(level)
  if path is not None and not isinstance(FLAGS.config, config_dict.ConfigDict):
    got = "None" if FLAGS.config is None else f"a {type(FLAGS.config).__name__}"
    _fail(f"config file {path!r}: get_config() returned {got}; expected an "
          "ml_collections.ConfigDict (e.g. recipes.base(...))", USAGE_ERROR)
  if len(rest) > 1:
    hint = f" (did you mean --config={rest[1]}?)" if rest[1].endswith(".py") else ""
    _fail(f"unexpected argument {rest[1]!r}{hint}; flags are written --name=value", USAGE_ERROR)
  if FLAGS.config is None:
    _fail("--config=FILE is required, e.g. --config=configs/demo.py (see --help)", USAGE_ERROR)
  if not FLAGS.workdir:
    _fail("--workdir=DIR is required: checkpoints, logs and the model go there (see --help)",
          USAGE_ERROR)
  return rest


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
  from rlt_jax.checkpoints import checkpoint
  from rlt_jax.data import input_pipeline, tfrecord
  from rlt_jax.runtime import console, files
  from rlt_jax.training import configure, run, train
  verbosity = FLAGS["verbosity"]  # absl's; it reads 0 (INFO) when not given
  console.setup_logging(verbose=FLAGS.verbose or (verbosity.present and verbosity.value >= 0))
  logging.info("command: %s", shlex.join(sys.argv))
  try:
    run.run(FLAGS.config, FLAGS.workdir)
  except (configure.ConfigError, files.UnsafeWorkdir, files.WorkdirLocked,
          tfrecord.CorruptRecordError, input_pipeline.DataError, train.NonFiniteLossError,
          checkpoint.NoRestorableCheckpoint, input_pipeline.BadRecordError, OSError) as e:
    logging.info("stopped by an error", exc_info=True)  # the traceback: log file only
    usage = isinstance(e, (configure.ConfigError, files.UnsafeWorkdir))
    _fail(str(e), USAGE_ERROR if usage else RUN_ERROR)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
