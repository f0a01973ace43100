"""TFRecord files without TensorFlow: framing with masked CRC32C, atomic writes, offset index.

A record is: length (uint64 LE), masked CRC32C of the length, payload, masked CRC32C of the
payload. Every shard we write gets an offset index, `.rlt_index/SHARD.npy` beside it, holding
(offset, length) per record so readers have random access (global shuffling); it lives in a
hidden folder so that DMVR-style globs (`train.tfrecord-*`, as tf.data and Scenic use) match
shards only. An index is checked against its shard before use. Shards written elsewhere (DMVR,
Scenic), and shards whose index is missing or stale, are indexed by scanning their headers,
which reads 12 bytes per record.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import re
import struct
import tempfile

import google_crc32c
import numpy as np
from absl import logging
from etils import epath

from rlt_jax.runtime import files

INDEX_DIR = ".rlt_index"
INDEX_SUFFIX = ".index.npy"  # the index's old place, beside the shard: ignored, never a shard
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MIN_RECORD = _HEADER.size + _FOOTER.size
_SHARD_NAME = re.compile(r"(?P<prefix>.+)-(?P<index>\d+)-of-(?P<count>\d+)")
BUILD_HELP = ("build them with `python data/build_tfrecords.py --format kinetics|ssv2|list "
              "--annotations FILE --video_dir DIR --output_dir OUT --split SPLIT` (README.md, "
              "section \"Data\")")


CLASSES_FILE = "classes.txt"  # beside a shard set: class names, one per line (line = label)


class CorruptRecordError(ValueError):
  """A record whose framing or checksum is wrong; the message names the shard and offset."""


def masked_crc32c(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", masked_crc32c(length)) + payload
          + _FOOTER.pack(masked_crc32c(payload)))


class ShardWriter:
  """Writes one local shard under a fresh hidden temporary name; `close()` publishes it with its
  index.

  The temporary is created exclusively (mkstemp) beside the shard, so nothing planted there, a
  symlink included, is ever written through. Used as a context manager, an exception leaves
  nothing under the final names.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                     dir=self.path.parent)
    self._file = os.fdopen(fd, "wb")
    self._offsets: list[tuple[int, int]] = []
    self._position = 0

  def write(self, payload: bytes) -> None:
    data = frame(payload)
    self._file.write(data)
    self._offsets.append((self._position, len(data)))
    self._position += len(data)

  def close(self) -> None:
    try:
      self._file.flush()
      os.fsync(self._file.fileno())
      self._file.close()
      write_index(self.path, np.asarray(self._offsets, np.int64).reshape(-1, 2))
      files.publish_mode(self._tmp)
      os.replace(self._tmp, self.path)
    except BaseException:
      self.abort()
      raise

  def abort(self) -> None:
    self._file.close()
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self._tmp)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.abort() if exc_type else self.close()


def index_path(shard: str | os.PathLike) -> epath.Path:
  """Where a shard's offset index lives (the one place that knows)."""
  shard = epath.Path(shard)
  return shard.parent / INDEX_DIR / f"{shard.name}.npy"


def write_index(shard: str | os.PathLike, offsets: np.ndarray) -> None:
  path = pathlib.Path(index_path(shard))
  path.parent.mkdir(exist_ok=True)
  with files.atomic_write(path, "wb") as f:
    np.save(f, offsets)


def scan_index(shard: str | os.PathLike) -> np.ndarray:
  """(offset, framed length) of every record, from the headers alone."""
  shard = epath.Path(shard)
  offsets, position = [], 0
  with shard.open("rb") as f:
    while header := f.read(_HEADER.size):
      if len(header) < _HEADER.size:
        raise CorruptRecordError(f"{shard}: truncated record header at offset {position}")
      length, crc = _HEADER.unpack(header)
      if crc != masked_crc32c(header[:8]):
        raise CorruptRecordError(f"{shard}: bad length checksum at offset {position}")
      size = _HEADER.size + length + _FOOTER.size
      offsets.append((position, size))
      position += size
      f.seek(position)
  if position != shard.stat().length:
    raise CorruptRecordError(f"{shard}: the last record (offset {offsets[-1][0]}) is truncated")
  return np.asarray(offsets, np.int64).reshape(-1, 2)


def _index_problem(offsets: np.ndarray, size: int) -> str | None:
  """What makes `offsets` wrong for a shard of `size` bytes, or None if it fits exactly."""
  if offsets.dtype != np.int64 or offsets.ndim != 2 or offsets.shape[1] != 2:
    return f"expected an (N, 2) int64 array, got {offsets.dtype} {offsets.shape}"
  if not len(offsets):
    return f"it lists no records but the shard holds {size} bytes" if size else None
  starts, lengths = offsets[:, 0], offsets[:, 1]
  if (bad := np.flatnonzero((lengths < _MIN_RECORD) | (lengths > size))).size:
    return f"record {bad[0]} has length {lengths[bad[0]]}; expected {_MIN_RECORD} to {size}"
  ends = starts + lengths
  if starts[0] != 0:
    return f"record 0 starts at {starts[0]}, not 0"
  if (gap := np.flatnonzero(starts[1:] != ends[:-1])).size:
    i = gap[0] + 1
    return f"record {i} starts at {starts[i]}, not where record {i - 1} ends ({ends[i - 1]})"
  if ends[-1] != size:
    return f"the records end at {ends[-1]} but the shard holds {size} bytes"
  return None


def read_index(shard: str | os.PathLike) -> np.ndarray:
  """The shard's (offset, length) per record: its index if that fits the shard exactly, else a
  header scan, so a stale or damaged index never drops or invents records."""
  shard = epath.Path(shard)
  path = index_path(shard)
  if not path.exists():  # (a missing file raises a backend's own error type on gs://)
    return scan_index(shard)
  try:
    with path.open("rb") as f:
      offsets = np.load(f, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    problem = f"unreadable: {e}"
  else:
    if not (problem := _index_problem(offsets, shard.stat().length)):
      return offsets
  logging.warning("%s: ignoring its offset index %s (%s); scanning the record headers instead",
                  shard, path, problem)
  return scan_index(shard)


def unframe(shard: str | os.PathLike, offset: int, data: bytes) -> bytes:
  """The payload of one framed record, its checksums verified."""
  if len(data) < _HEADER.size + _FOOTER.size:
    raise CorruptRecordError(f"{shard}: truncated record at offset {offset}")
  length, length_crc = _HEADER.unpack_from(data)
  if length_crc != masked_crc32c(data[:8]) or len(data) != _HEADER.size + length + _FOOTER.size:
    raise CorruptRecordError(f"{shard}: bad record length at offset {offset}")
  payload = data[_HEADER.size:_HEADER.size + length]
  if _FOOTER.unpack_from(data, _HEADER.size + length)[0] != masked_crc32c(payload):
    raise CorruptRecordError(f"{shard}: CRC mismatch in the record at offset {offset}")
  return payload


def read_records(shard: str | os.PathLike) -> list[bytes]:
  """Every payload of a shard, in order (for tools and tests; the pipeline reads by index)."""
  data = epath.Path(shard).read_bytes()
  return [unframe(shard, int(o), data[o:o + n]) for o, n in scan_index(shard)]


def list_shards(patterns: str, *, allow_incomplete: bool = False) -> list[epath.Path]:
  """Shards matching comma-separated globs (local or gs://), each glob's matches sorted, a shard
  matched twice listed once; index files and hidden files (temporaries) are never shards.

  Shards named `PREFIX-XXXXX-of-NNNNN` must form whole sets: all N present, from one build that
  finished (the build summary beside them, if any, says so), since a partial set would silently
  train or evaluate on part of the data. `allow_incomplete=True` skips this check, for a glob
  that picks some shards on purpose.
  """
  shards: dict[epath.Path, None] = {}
  for pattern in filter(None, (p.strip() for p in patterns.split(","))):
    path = epath.Path(pattern)
    matches = sorted(p for p in path.parent.glob(path.name)
                     if not p.name.endswith(INDEX_SUFFIX) and not p.name.startswith("."))
    if not matches:
      raise FileNotFoundError(f"no TFRecord shards match {pattern!r}; {BUILD_HELP}")
    shards.update(dict.fromkeys(matches))
  if not shards:
    raise FileNotFoundError(f"no TFRecord shard patterns given ({patterns!r}); {BUILD_HELP}")
  if not allow_incomplete:
    _check_complete(list(shards))
  return list(shards)


def _check_complete(shards: list[epath.Path]) -> None:
  """Raises ValueError for a `-of-N` set with shards missing, or from two builds or an
  unfinished one."""
  sets: dict[tuple[epath.Path, str], dict[str, set[str]]] = collections.defaultdict(dict)
  for shard in shards:
    if match := _SHARD_NAME.fullmatch(shard.name):
      sets[shard.parent, match["prefix"]].setdefault(match["count"], set()).add(match["index"])
  advice = ("rerun the build (it resumes), or pass allow_incomplete=True to read these shards "
            "anyway")
  for (folder, prefix), counts in sets.items():
    where = folder / prefix
    if len(counts) > 1:
      raise ValueError(f"{where}: shards of {len(counts)} different builds (-of-"
                       f"{' and -of-'.join(sorted(counts))}); remove the stale ones, or pass "
                       "allow_incomplete=True to read them all")
    (count, indices), = counts.items()
    width, expected = len(min(indices)), int(count)
    present = {int(i) for i in indices}
    if beyond := sorted(i for i in present if i >= expected):
      raise ValueError(f"{where}-{beyond[0]:0{width}d}-of-{count}: numbered past the end of "
                       f"its set of {expected}; remove it, or pass allow_incomplete=True")
    if missing := [f"{prefix}-{i:0{width}d}-of-{count}" for i in range(expected)
                   if i not in present]:
      listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
      raise ValueError(f"{where}: {len(present)} of {expected} shards present, missing {listed} "
                       f"(an unfinished build or a partial copy); {advice}")
    _check_summary(folder, prefix, count, advice)


def _check_summary(folder: epath.Path, prefix: str, count: str, advice: str) -> None:
  """A set written by build_tfrecords must come from a build whose summary says it finished."""
  if not prefix.endswith(".tfrecord"):
    return
  path = folder / f"{prefix.removesuffix('.tfrecord')}.summary.json"
  if not path.exists():
    return
  try:
    summary = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not a build summary ({e}); {advice}") from None
  if not summary.get("complete", True):  # summaries without the key were written at the end
    raise ValueError(f"{path}: the build has not finished; {advice}")
  if summary.get("shards", int(count)) != int(count):
    raise ValueError(f"{path}: describes a build of {summary['shards']} shards, but the shards "
                     f"beside it are {prefix}-*-of-{count}; {advice}")
