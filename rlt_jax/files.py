"""Safe file writes and the workdir lock.

Every file the project writes goes through `atomic_write` (or `atomic_directory`): the bytes land
in a fresh, exclusively created temporary name beside the target and are renamed over it only
when complete, so a crash, a kill or a racing writer never leaves a half-written file behind and
never clobbers another writer's temporary.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import socket
import tempfile
from typing import IO, Iterator


def _umask() -> int:
  """The process umask, read without changing it (os.umask would race other threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
  """mkstemp/mkdtemp create private entries; give them the mode a plain open/mkdir would."""
  os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file beside `path`; renames it onto `path` when the block succeeds."""
  path = pathlib.Path(path)
  if "b" not in mode:
    open_kwargs.setdefault("encoding", "utf-8")
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    publish_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a fresh staging directory beside `path`; it replaces `path` when the block succeeds."""
  path = pathlib.Path(path)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  publish_mode(staging, directory=True)
  try:
    yield staging
    publish_directory(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def publish_directory(staging: pathlib.Path, path: pathlib.Path) -> None:
  """Renames a complete `staging` directory onto `path`, replacing what is there; an old
  `path` is moved aside first and deleted after, so `path` is never half-written."""
  for attempt in range(3):  # a racing writer may publish between our check and rename
    try:
      if path.exists():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old",
                                            dir=path.parent))
        path.rename(old / path.name)
        staging.rename(path)
        shutil.rmtree(old, ignore_errors=True)
      else:
        staging.rename(path)
      return
    except OSError:
      if attempt == 2:
        raise


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (a `.lock` file) for the block.

  The lock is an `flock`, so it dies with its process: a lock left by a killed run is simply
  taken over. The file records who holds it, so the refusal can name the other process.
  """
  lock_path = pathlib.Path(workdir) / ".lock"
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown process"
      raise WorkdirLocked(
          f"workdir {workdir} is in use by {holder}; wait for it to finish or use another "
          "--workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)
