"""What a person running training sees: a quiet console, a full log file, a progress bar, a summary.

Libraries (orbax, absl, jax) log at INFO a lot; that chatter goes to `log.txt` in the workdir
(`log.process{N}.txt` on process N > 0), and the console keeps warnings, errors and the lines
passed to `say`, printed by process 0 only so that a pod slice prints each line once.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import shlex
import sys
from typing import Any, Mapping

import tqdm
from tensorboardX import SummaryWriter

from rlt_jax.runtime import files

_FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
# say() lines: printed by say itself, so they reach the log file but never the console handler.
_SAY = logging.getLogger("rlt_jax.runtime.console")
_SAY.propagate = False
_SAY.setLevel(logging.INFO)
_installed: list[logging.Handler] = []
_log_file: str | None = None
_early: logging.handlers.BufferingHandler | None = None


def _is_main() -> bool:
  import jax  # lazily: `--help` and flag errors should not pay for importing jax
  return jax.process_index() == 0


def _drop_missing_libtpu(record: logging.LogRecord) -> bool:
  """jax probes for a TPU on every machine and logs its failure when libtpu is not installed;
  on CPU and GPU hosts that line is noise. Other TPU failures (a busy TPU) still pass."""
  message = record.getMessage()
  return not (message.startswith("Unable to initialize backend 'tpu'")
              and "libtpu.so: cannot open shared object file" in message)


def log_path(workdir: str, process_index: int) -> str:
  """Where process `process_index` logs."""
  name = "log.txt" if process_index == 0 else f"log.process{process_index}.txt"
  return os.path.join(workdir, name)


class _PrivateFileHandler(logging.FileHandler):
  """A log file opened for appending without following a planted link."""

  def _open(self):
    return files.open_append(self.baseFilename)


def setup_logging(verbose: bool) -> None:
  """Sends WARNING+ to stderr (everything with `verbose`) and keeps every record at INFO in
  memory until `log_to_file` names the file, so a run refused before it may write leaves no
  log behind. Call after `jax.distributed.initialize`; calling again replaces the handlers."""
  global _log_file, _early
  from absl import logging as absl_logging
  root = logging.getLogger()
  for handler in _installed:
    root.removeHandler(handler)
    _SAY.removeHandler(handler)
    handler.close()
  _installed.clear()
  _log_file = None
  root.removeHandler(absl_logging.get_absl_handler())  # it prints everything to stderr
  root.setLevel(min(root.getEffectiveLevel(), logging.INFO))  # --verbosity=1 keeps DEBUG
  logging.getLogger("absl").setLevel(logging.NOTSET)
  console = logging.StreamHandler(sys.stderr)
  console.setLevel(logging.NOTSET if verbose else logging.WARNING)
  console.addFilter(_drop_missing_libtpu)
  console.setFormatter(logging.Formatter(_CONSOLE_FORMAT))
  _early = logging.handlers.BufferingHandler(capacity=100_000)
  root.addHandler(console)
  root.addHandler(_early)
  _SAY.addHandler(_early)
  _installed.extend([console, _early])
  import jax
  if jax.process_index() != 0:  # starts the backends: what they log is buffered in `_early`
    console.setLevel(logging.WARNING)


def log_to_file(workdir: str) -> str | None:
  """Writes what was logged so far, and all that follows, to this process's log file in
  `workdir` (opened without following links); returns its path. Call once the workdir has
  been checked and locked."""
  global _log_file, _early
  import jax
  if _early is None:  # setup_logging was not called (library use): leave logging alone
    return None
  root = logging.getLogger()
  _log_file = log_path(workdir, jax.process_index())
  file = _PrivateFileHandler(_log_file, encoding="utf-8")
  file.setFormatter(logging.Formatter(_FILE_FORMAT))
  for record in _early.buffer:
    file.handle(record)
  root.removeHandler(_early)
  _SAY.removeHandler(_early)
  _installed.remove(_early)
  _early = None
  root.addHandler(file)
  _SAY.addHandler(file)
  _installed.append(file)
  return _log_file


def say(message: str) -> None:
  """A line for the person running the job: stdout on process 0 (above any progress bar),
  and the log file of every process."""
  _SAY.info(message)
  if _is_main():
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


class _Progress:
  """The step bar on process 0 (steps, rate, ETA); every method is a no-op on other processes.

  On a terminal the bar redraws twice a second; elsewhere (CI, `| tee`, cluster logs) every
  redraw is a new line, so it redraws at most every 30 s.
  """

  def __init__(self, total: int, initial: int = 0, desc: str = "train"):
    self._bar = None
    if _is_main():
      terminal = sys.stderr.isatty()
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                            file=sys.stderr, dynamic_ncols=terminal,
                            mininterval=0.5 if terminal else 30.0)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def set_postfix(self, values: Mapping[str, Any]) -> None:
    """Shown from the next redraw: an immediate redraw would print a line per call off a TTY."""
    if self._bar is not None:
      self._bar.set_postfix(values, refresh=False)

  def write(self, line: str) -> None:
    say(line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> _Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def progress(total: int, initial: int = 0, desc: str = "train") -> _Progress:
  """A progress bar over steps `initial`..`total` (a resumed run starts at its checkpoint)."""
  return _Progress(total, initial, desc)


def _duration(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, secs = divmod(round(seconds), 60)
  if minutes < 60:
    return f"{minutes} min {secs:02d} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes:02d} min"


def _value(key: str, value: float) -> str:
  """Accuracies and fractions as percentages, counts as integers, the rest to 4 digits."""
  leaf = key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
  if leaf in ("top1", "top5", "accuracy") or leaf.endswith("_fraction"):
    return f"{value:.2%}"
  if isinstance(value, int):
    return str(value)
  return f"{value:.4g}"


def summary(metrics: Mapping[str, Any], *, wall_time_s: float,
            tokens_kept: Mapping[str, float] | None = None, workdir: str | None = None,
            model_dir: str | None = None, checkpoint_dir: str | None = None,
            tensorboard_dir: str | None = None, labels: str | None = None,
            title: str = "Training finished") -> str:
  """The closing block: the numbers worth reporting, where everything went, what to run next.

  `metrics`' numbers are listed in order (other values are skipped); `tokens_kept` gives the
  kept fraction where it was measured (e.g. 'train, after mixing', 'val'); a path left None is
  left out; `labels` (a classes.txt) is added to the predict command.
  """
  rows = [(key, _value(key, value)) for key, value in metrics.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool)]
  rows += [(f"tokens kept ({where})", f"{fraction:.1%}")
           for where, fraction in (tokens_kept or {}).items() if fraction is not None]
  rows += [(name, path) for name, path in [
      ("workdir", workdir), ("model", model_dir), ("checkpoints", checkpoint_dir),
      ("TensorBoard", tensorboard_dir), ("log", _log_file)] if path]
  width = max(len(key) for key, _ in rows) if rows else 0
  lines = [f"{title} in {_duration(wall_time_s)}."]
  lines += [f"  {key:<{width}}  {text}" for key, text in rows]
  if tensorboard_dir:
    lines.append(f"Curves:   tensorboard --logdir {shlex.quote(tensorboard_dir)}")
  if model_dir:
    command = f"python -m rlt_jax.predict --checkpoint {shlex.quote(model_dir)} --video FILE.mp4"
    lines.append(f"Predict:  {command}" + (f" --labels {shlex.quote(labels)}" if labels else ""))
  return "\n".join(lines)


class MetricsLog:
  """Metrics of a run: TensorBoard event files and metrics.jsonl in the workdir (process 0;
  other processes write nothing)."""

  def __init__(self, workdir: str):
    self.main = _is_main()
    self.writer = None
    if self.main:
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = files.open_append(os.path.join(workdir, "metrics.jsonl"))

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
