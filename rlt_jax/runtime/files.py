"""Safe file writes, the workdir's checks and its lock.

Every file the project writes goes through `atomic_write` (or `atomic_directory`): the bytes land
in a fresh, exclusively created temporary name beside the target and are renamed over it only
when complete, so a crash, a kill or a racing writer never leaves a half-written file behind and
never clobbers another writer's temporary.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import stat
import tempfile
from typing import IO, Any, Iterator


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


def check_output(path: str | None, flag: str) -> None:
  """Raises ValueError unless a file can be written at `path` (None: nothing to check), named
  by its command-line `flag`; commands call it before their work, not after it."""
  if not path:
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{flag} {path}: is a directory; expected a file name")
  if not os.path.isdir(folder):
    raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                   and not os.access(path, os.W_OK)):
    raise ValueError(f"{flag} {path}: not writable by you")


def write_json(path: str | os.PathLike, value: Any) -> None:
  """`value` as indented JSON at `path`, written atomically (`atomic_write`)."""
  with atomic_write(path) as f:
    json.dump(value, f, indent=1)


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


class UnsafeWorkdir(ValueError):
  """A workdir the run must not write into (someone else's, open to every user, planted
  links, a remote URL)."""


# What a run writes directly under its workdir: none of these may be a link or someone else's.
WORKDIR_ENTRIES = (".lock", "log.txt", "metrics.jsonl", "checkpoints", "tensorboard", "cache",
                   "model")


def _owner(uid: int) -> str:
  try:
    import pwd
    return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
  except (ImportError, KeyError):
    return f"uid {uid}"


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Checks that a run may write into `workdir`, then creates it; returns its absolute path.

  Refused, before anything is written: a URL (gs://…: mount the bucket instead), a workdir (or
  link to one) owned by another user, one that every user may write to without the sticky bit
  (others could plant links in it), anything but a directory, and an entry the run writes
  (`WORKDIR_ENTRIES`, log files) that is a symbolic link or belongs to another user. Files in
  it are then opened without following links (`open_private`), as git does with its own.
  """
  text = os.fspath(workdir)
  if "://" in text:
    raise UnsafeWorkdir(
        f"--workdir={text}: remote workdirs are not supported (checkpoints, the lock and logs "
        "need a file system); mount the bucket and pass the local path, e.g. gcsfuse "
        "--implicit-dirs --rename-dir-limit=1000000 BUCKET /mnt/BUCKET (launch/tpu_pod.sh "
        "does this on every worker)")
  path = pathlib.Path(text).absolute()
  me = os.geteuid()
  for parent in reversed(path.parents):  # a folder anyone may rename things in is no shelter
    st = _stat_or_none(parent)
    if st is not None and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
      raise UnsafeWorkdir(f"--workdir={text}: {parent} may be written by every user, who could "
                          "replace the workdir with a link; choose a workdir in a folder that "
                          "is not")
  if os.path.lexists(path):
    for label, st in (("", os.lstat(path)), (" (the directory its link points to)",
                                            _stat_or_none(path))):
      if st is None:
        raise UnsafeWorkdir(f"--workdir={text} is a link to nothing; remove it or choose "
                            "another workdir")
      if st.st_uid != me:
        raise UnsafeWorkdir(f"--workdir={text}{label} belongs to {_owner(st.st_uid)}, not to "
                            "you; a run writes only into a workdir of its own: choose another")
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
      raise UnsafeWorkdir(f"--workdir={text} is not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
      raise UnsafeWorkdir(f"--workdir={text} may be written by every user, who could plant "
                          f"links to other files in it; make it yours alone: chmod o-w {text}")
    for entry in path.iterdir():
      if entry.name in WORKDIR_ENTRIES or entry.name.startswith("log."):
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
          raise UnsafeWorkdir(f"{entry} is a symbolic link; a run never writes through links: "
                              "remove it")
        if st.st_uid != me:
          raise UnsafeWorkdir(f"{entry} belongs to {_owner(st.st_uid)}, not to you: remove it "
                              "or choose another workdir")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UnsafeWorkdir(f"--workdir={text}: cannot create it ({e.strerror})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise UnsafeWorkdir(f"--workdir={text} is not writable by you (read-only?); choose another")
  return path


def _stat_or_none(path: pathlib.Path) -> os.stat_result | None:
  try:
    return os.stat(path)
  except FileNotFoundError:
    return None


def open_private(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
  """os.open that never follows a final symbolic link (a planted link fails with ELOOP)."""
  try:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UnsafeWorkdir(f"{path} is a symbolic link; a run never writes through links: "
                          "remove it") from None
    raise


def open_append(path: str | os.PathLike) -> IO:
  """A text file opened for appending (created if missing), never through a link."""
  return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a",
                   encoding="utf-8")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
  """Deletes what interrupted writers left directly in `directory` (`.NAME.XXXX.tmp` files and
  staging directories, `.NAME.XXXX.old` directories); call only while holding its lock, when
  no writer can be at work there. Returns the names removed."""
  removed = []
  for entry in pathlib.Path(directory).iterdir():
    if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
      if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
      else:
        entry.unlink(missing_ok=True)
      removed.append(entry.name)
  return removed


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (a `.lock` file) for the block.

  The lock is an `flock`, so it dies with its process: a lock left by a killed run is simply
  taken over. The file records who holds it, so the refusal can name the other process. The
  file is never opened through a link.
  """
  lock_path = pathlib.Path(workdir) / ".lock"
  fd = open_private(lock_path, os.O_RDWR | os.O_CREAT)
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
