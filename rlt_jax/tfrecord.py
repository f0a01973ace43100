"""TFRecord files without TensorFlow: framing with masked CRC32C, atomic writes, offset index.

A record is: length (uint64 LE), masked CRC32C of the length, payload, masked CRC32C of the
payload. Every shard we write gets a sibling `SHARD.index.npy` holding (offset, length) per
record so readers have random access (global shuffling); shards written elsewhere (DMVR,
Scenic) are indexed by scanning their headers, which reads 12 bytes per record.
"""

from __future__ import annotations

import os
import struct

import google_crc32c
import numpy as np
from etils import epath

INDEX_SUFFIX = ".index.npy"
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


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
  """Writes one shard under a hidden temporary name; `close()` publishes it with its index.

  Used as a context manager, an exception leaves nothing under the final names.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)
    self._tmp = self.path.parent / f".{self.path.name}.tmp"
    self._file = self._tmp.open("wb")
    self._offsets: list[tuple[int, int]] = []
    self._position = 0

  def write(self, payload: bytes) -> None:
    data = frame(payload)
    self._file.write(data)
    self._offsets.append((self._position, len(data)))
    self._position += len(data)

  def close(self) -> None:
    self._file.close()
    write_index(self.path, np.asarray(self._offsets, np.int64).reshape(-1, 2))
    self._tmp.replace(self.path)

  def abort(self) -> None:
    self._file.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.abort() if exc_type else self.close()


def index_path(shard: str | os.PathLike) -> epath.Path:
  shard = epath.Path(shard)
  return shard.parent / (shard.name + INDEX_SUFFIX)


def write_index(shard: str | os.PathLike, offsets: np.ndarray) -> None:
  path = index_path(shard)
  tmp = path.parent / f".{path.name}.tmp"
  with tmp.open("wb") as f:
    np.save(f, offsets)
  tmp.replace(path)


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


def read_index(shard: str | os.PathLike) -> np.ndarray:
  """The shard's offset index: its `.index.npy` if present, else a header scan."""
  path = index_path(shard)
  if path.exists():
    with path.open("rb") as f:
      offsets = np.load(f, allow_pickle=False)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
      raise ValueError(f"{path}: expected an (N, 2) int64 offset index, got {offsets.shape}")
    return offsets
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
