"""main.py and console.py: short help, one-line errors, a quiet console, progress bar, summary.

No training here: flag errors stop before jax starts, and the error paths of `main` run against
a stand-in `rlt_jax.training.train` whose `run` raises.
"""

import logging
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from rlt_jax import main
from rlt_jax.runtime import console, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """
import ml_collections

def get_config():
  return ml_collections.ConfigDict({"batch_size": 32, "seed": 0,
                                    "rlt": {"threshold": 0.1, "packing": True}})
"""


def run(args, cwd=ROOT, script=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  command = [sys.executable, script] if script else [sys.executable, "-m", "rlt_jax.main"]
  return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "config.py"
  path.write_text(CONFIG)
  return str(path)


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_with_the_usage_and_the_main_flags(flag):
  result = run([flag])
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage: python -m rlt_jax.main --config=")
  for name in ("--config=FILE", "--config.KEY=VALUE", "--workdir=DIR", "--verbose"):
    assert name in result.stdout
  if flag != "--helpfull":
    assert len(result.stdout.splitlines()) < 30


def one_line_error(result, code=2):
  assert result.returncode == code, (result.stdout, result.stderr)
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("--config.rlt.treshold=0.1",
     "error: unknown config key 'rlt.treshold' (did you mean 'rlt.threshold'?)"),
    ("--config.treshold=0.1",
     "error: unknown config key 'treshold' (did you mean 'rlt.threshold'?)"),
    ("--config.batch_size=abc", "error: --config.batch_size=abc: expected an integer"),
    ("--config.rlt.threshold=high", "error: --config.rlt.threshold=high: expected a number"),
    ("--config.rlt.packing=maybe", "error: --config.rlt.packing=maybe: expected true or false"),
])
def test_a_bad_override_is_one_line_naming_the_key(config_file, tmp_path, override, expected):
  result = run([f"--config={config_file}", f"--workdir={tmp_path / 'w'}", override])
  assert one_line_error(result) == expected
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, expected", [
    (["--workdir=/tmp/w"], "error: --config=FILE is required"),
    (["--config=CONFIG"], "error: --workdir=DIR is required"),
    (["--config=configs/dmeo.py", "--workdir=/tmp/w"],
     "error: config file 'configs/dmeo.py' not found (did you mean 'configs/demo.py'?)"),
    (["--config=no/such.py", "--workdir=/tmp/w"], "error: config file 'no/such.py' not found"),
    (["CONFIG", "--workdir=/tmp/w"], "error: unexpected argument 'CONFIG' (did you mean --config="),
    (["--config=CONFIG", "--workdri=/tmp/w"], "error: Unknown command line flag 'workdri'"),
])
def test_a_missing_or_misspelt_flag_is_one_line(config_file, args, expected):
  args = [a.replace("CONFIG", config_file) for a in args]
  assert one_line_error(run(args)).startswith(expected.replace("CONFIG", config_file))


@pytest.mark.parametrize("text, expected", [
    ("def get_config(:\n  pass\n", "line 1: SyntaxError: invalid syntax"),
    ("import ml_collections\nraise RuntimeError('no data here')\n",
     "line 2: RuntimeError: no data here"),
    ("def get_config():\n  return {}['x']\n", "line 2: KeyError: 'x'"),
    ("def get_config():\n  pass\n", "get_config() returned None; expected an "
     "ml_collections.ConfigDict (e.g. recipes.base(...))"),
    ("def get_config():\n  return {'batch_size': 8}\n", "get_config() returned a dict; "
     "expected an ml_collections.ConfigDict (e.g. recipes.base(...))"),
])
def test_a_config_file_that_does_not_load_is_one_line_exit_2(tmp_path, text, expected):
  path = tmp_path / "broken.py"
  path.write_text(text)
  result = run([f"--config={path}", f"--workdir={tmp_path / 'w'}"])
  assert result.returncode == 2
  assert one_line_error(result) == f"error: config file {str(path)!r}" + (
      ", " if expected.startswith("line") else ": ") + expected
  assert not (tmp_path / "w").exists()


def test_config_helpers_suggest_the_nearest_key():
  config = ml_collections.ConfigDict({"lr": 1.0, "rlt": {"threshold": 0.1, "policy": "rlt"}})
  keys = main.config_keys(config)
  assert keys == ["lr", "rlt", "rlt.policy", "rlt.threshold"]
  assert main.closest("rlt.threshhold", keys) == "rlt.threshold"
  assert main.closest("model.policy", keys) == "rlt.policy"  # the right leaf, wrong section
  assert main.unknown_key_message("zzz", keys) == "unknown config key 'zzz'"


# A stand-in for rlt_jax.training.run: its run logs like the libraries do, then raises ERROR.
STAND_IN = """
import logging, sys, types
import rlt_jax.training
from rlt_jax.data import tfrecord
from rlt_jax.runtime import console, files
from rlt_jax.training.configure import ConfigError
from rlt_jax.training.train import NonFiniteLossError

stand_in = types.ModuleType("rlt_jax.training.run")

def run(config, workdir):
  files.prepare_workdir(workdir)
  console.log_to_file(workdir)  # as the real run does, once the workdir is checked and locked
  logging.getLogger("orbax").info("library chatter")
  logging.getLogger("orbax").warning("a library warning")
  console.say(f"batch size {config.batch_size}")
  if ERROR is not None:
    raise ERROR

stand_in.run = run
sys.modules["rlt_jax.training.run"] = rlt_jax.training.run = stand_in
from absl import app
from rlt_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("error, message, code", [
    (None, None, 0),
    ("ConfigError", "config.rlt.threshold=-1: expected >= 0", 2),
    ("files.WorkdirLocked", "workdir W is in use by pid 7 on host", 1),
    ("FileNotFoundError", "no TFRecord shards match '/data/train-*'", 1),
    ("NonFiniteLossError", "the loss, gradients or updates became non-finite at step 3", 1),
])
def test_main_keeps_the_console_quiet_and_reports_errors_in_one_line(config_file, tmp_path,
                                                                       error, message, code):
  script = tmp_path / "stand_in.py"
  script.write_text(STAND_IN.replace("ERROR", f"{error}({message!r})" if error else "None"))
  workdir = tmp_path / "work"
  result = run([f"--config={config_file}", f"--workdir={workdir}"], script=str(script))
  assert result.returncode == code, result.stderr
  assert result.stdout == "batch size 32\n"
  stderr = result.stderr.splitlines()
  assert stderr[0] == "WARNING orbax: a library warning"
  assert stderr[1:] == ([f"error: {message}"] if error else [])
  log = (workdir / "log.txt").read_text()
  assert "library chatter" in log and "batch size 32" in log and "command: " in log
  assert ("Traceback" in log) == bool(error)


def test_verbose_shows_the_library_log(config_file, tmp_path):
  script = tmp_path / "stand_in.py"
  script.write_text(STAND_IN.replace("ERROR", "None"))
  result = run([f"--config={config_file}", f"--workdir={tmp_path}", "--verbose"],
               script=str(script))
  assert result.returncode == 0, result.stderr
  assert "INFO orbax: library chatter" in result.stderr
  assert "Unable to initialize backend 'tpu'" not in result.stderr


# ------------------------------------------------------------------ console.py in-process


@pytest.fixture
def clean_logging():
  """Puts the root logger back as it was: setup_logging replaces its handlers."""
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  yield
  for handler in list(console._installed):
    root.removeHandler(handler)
    console._SAY.removeHandler(handler)
    handler.close()
  console._installed.clear()
  console._log_file = console._early = None
  root.handlers[:] = handlers
  root.setLevel(level)


def test_setup_logging_sends_info_to_the_file_and_warnings_to_the_console(
    tmp_path, capsys, clean_logging):
  console.setup_logging(verbose=False)
  logging.getLogger("orbax").info("saving step 10")  # before the file: kept, then written
  logging.getLogger("orbax").warning("slow disk")
  assert not list(tmp_path.iterdir())  # nothing written until the workdir is known good
  path = console.log_to_file(str(tmp_path))
  assert path == str(tmp_path / "log.txt")
  console.say("step 10/100")
  out, err = capsys.readouterr()
  assert out == "step 10/100\n"
  assert "saving step 10" not in err and "slow disk" in err
  log = open(path).read()
  assert "saving step 10" in log and "slow disk" in log and "step 10/100" in log


def test_the_log_file_is_never_opened_through_a_planted_link(tmp_path, clean_logging, victim):
  (tmp_path / "log.txt").symlink_to(victim)
  console.setup_logging(verbose=False)
  with pytest.raises(files.UnsafeWorkdir, match="is a symbolic link"):
    console.log_to_file(str(tmp_path))
  assert victim.read_text() == "precious"


def test_verbose_logging_shows_info_but_not_the_missing_libtpu_line(
    tmp_path, capsys, clean_logging):
  console.setup_logging(verbose=True)
  path = console.log_to_file(str(tmp_path))
  probe = logging.getLogger("jax._src.xla_bridge")
  probe.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: "
             "libtpu.so: cannot open shared object file: No such file or directory")
  probe.info("Unable to initialize backend 'tpu': TPU is already in use by process 12")
  logging.getLogger("orbax").info("saving step 10")
  err = capsys.readouterr().err
  assert "saving step 10" in err and "already in use" in err and "libtpu.so" not in err
  assert "libtpu.so" in open(path).read()


def test_log_paths_per_process():
  assert console.log_path("/w", 0) == "/w/log.txt"
  assert console.log_path("/w", 3) == "/w/log.process3.txt"


def test_progress_bar_off_a_terminal_redraws_rarely_and_keeps_lines_whole(capsys):
  bar = console.progress(100, 40, "train")
  for _ in range(10):
    bar.update(1)
    bar.set_postfix({"loss": 1.25})
  bar.write("step 50/100 | loss 1.25")
  bar.close()
  bar.close()  # twice is harmless (a finally: after a normal close)
  out, err = capsys.readouterr()
  assert out == "step 50/100 | loss 1.25\n"
  redraws = [part for part in err.split("\r") if part.strip()]
  assert len(redraws) <= 4, redraws  # start, around the written line, close: not per update
  assert "50/100" in redraws[-1] and "loss=1.25" in redraws[-1] and "step/s" in redraws[-1]


def test_other_processes_show_no_bar_and_say_nothing(tmp_path, capsys, monkeypatch,
                                                     clean_logging):
  console.setup_logging(verbose=False)
  path = console.log_to_file(str(tmp_path))
  monkeypatch.setattr(console, "_is_main", lambda: False)
  with console.progress(10, 0, "train") as bar:
    bar.update(5)
    bar.set_postfix({"loss": 1.0})
    bar.write("step 5/10")
  console.say("done")
  assert capsys.readouterr() == ("", "")
  assert "step 5/10" in open(path).read()  # each process keeps its own log


def test_summary_lists_metrics_paths_and_next_commands():
  text = console.summary(
      {"top1": 0.3708, "top5": 0.9, "videos": 240, "clips_per_s": 123.456, "name": "x"},
      wall_time_s=192.4, tokens_kept={"train, after mixing": 0.574, "val": 0.58},
      workdir="/runs/a b",
      model_dir="/runs/a b/model", checkpoint_dir="/runs/a b/checkpoints",
      tensorboard_dir="/runs/a b/tensorboard", labels="/data/classes.txt")
  assert text == textwrap.dedent("""\
      Training finished in 3 min 12 s.
        top1                               37.08%
        top5                               90.00%
        videos                             240
        clips_per_s                        123.5
        tokens kept (train, after mixing)  57.4%
        tokens kept (val)                  58.0%
        workdir                            /runs/a b
        model                              /runs/a b/model
        checkpoints                        /runs/a b/checkpoints
        TensorBoard                        /runs/a b/tensorboard
      Curves:   tensorboard --logdir '/runs/a b/tensorboard'
      Predict:  python -m rlt_jax.predict --checkpoint '/runs/a b/model' --video FILE.mp4 \
--labels /data/classes.txt""")
  short = console.summary({}, wall_time_s=7300.0, title="Evaluation finished")
  assert short == "Evaluation finished in 2 h 01 min."


@pytest.mark.parametrize("former, now", [("rlt_jax.tokens", "rlt_jax.kept_tokens"),
                                         ("rlt_jax.synthetic", "rlt_jax.data.synthetic"),
                                         ("rlt_jax.build_tfrecords",
                                          "rlt_jax.data.build_tfrecords")])
def test_former_command_names_still_work(former, now):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  helps = [subprocess.run([sys.executable, "-m", name, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120) for name in (former, now)]
  assert [h.returncode for h in helps] == [0, 0]
  assert helps[0].stdout == helps[1].stdout and "usage:" in helps[0].stdout
