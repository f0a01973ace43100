"""Reads PyTorch checkpoint files (.pth) into numpy, without torch and without running them.

A .pth file is a pickle, and unpickling can call anything the file names (os.system, eval…).
This reader resolves only the globals that rebuild tensors, storages, ordered dicts and
plain data; a file that names any other global is refused before anything in it is called.
Both layouts torch.save writes are read: the zip archive (torch ≥ 1.6) and the legacy
stream (magic number, sys info, pickle, storage keys, raw storages).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

try:
  from numpy._core import multiarray as _multiarray
except ImportError:  # numpy < 2
  from numpy.core import multiarray as _multiarray

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(ValueError):
  """The file asks the unpickler for something other than tensors and plain data."""


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer; filled later for the legacy format (data follows the pickle)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
  """A tensor view waiting for its storage (materialised once all storages are read)."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.array
    if not self.size:
      return flat[self.offset].copy()
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
    return np.ascontiguousarray(view)


class Namespace(dict):
  """Stand-in for argparse.Namespace (training args stored beside weights): data only."""

  def __setstate__(self, state):
    self.update(state if isinstance(state, dict) else {})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, source: str, storages: dict[str, _Storage],
               read_storage=None):
    super().__init__(file)
    self.source, self.storages, self.read_storage = source, storages, read_storage

  def find_class(self, module: str, name: str):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    raise UnsafeCheckpointError(
        f"{self.source}: the pickle asks for '{module}.{name}'; only tensors, dicts and plain "
        "data may be loaded, so this file was refused and nothing in it was run")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"{self.source}: unexpected persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")
    if key not in self.storages:
      storage = _Storage(storage_type.dtype, numel)
      if self.read_storage is not None:
        storage.array = self.read_storage(key, storage.dtype, numel)
      self.storages[key] = storage
    return self.storages[key]


def load(path: str | os.PathLike) -> Any:
  """The checkpoint's object tree with every tensor as a numpy array (dtype kept)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  storages: dict[str, _Storage] = {}
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names if n.endswith("data.pkl")]
      if len(pickles) != 1:
        raise ValueError(f"{path}: a zip, but not a torch.save archive (no single data.pkl)")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder = prefix + "byteorder"
      if byteorder in names and archive.read(byteorder).decode().strip() != "little":
        raise ValueError(f"{path}: big-endian checkpoints are not supported")

      def read_storage(key, dtype, numel):
        raw = archive.read(f"{prefix}data/{key}")
        return np.frombuffer(raw, dtype=dtype, count=numel)

      tree = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, storages,
                                  read_storage).load()
  else:
    with open(path, "rb") as f:
      tree = _load_legacy(f, path, storages)
  return _materialize(tree)


def _load_legacy(f: BinaryIO, path: str, storages: dict[str, _Storage]) -> Any:
  plain = lambda: _RestrictedUnpickler(f, path, {}).load()
  try:
    magic = plain()
  except (pickle.UnpicklingError, EOFError) as e:
    raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the "
                     f"legacy format): {e}") from None
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number {magic!r})")
  if plain() != 1001:
    raise ValueError(f"{path}: unsupported legacy checkpoint protocol")
  sys_info = plain()
  if not sys_info.get("little_endian", True):
    raise ValueError(f"{path}: big-endian checkpoints are not supported")
  tree = _RestrictedUnpickler(f, path, storages).load()
  for key in plain():
    storage = storages[str(key)]
    numel = int(np.frombuffer(f.read(8), "<i8")[0])
    raw = f.read(numel * storage.dtype.itemsize)
    if len(raw) != numel * storage.dtype.itemsize:
      raise ValueError(f"{path}: truncated storage {key}")
    storage.array = np.frombuffer(raw, dtype=storage.dtype)
  return tree


def _materialize(tree: Any) -> Any:
  if isinstance(tree, _Tensor):
    return tree.materialize()
  if isinstance(tree, dict):
    out = type(tree)() if isinstance(tree, (collections.OrderedDict, Namespace)) else {}
    out.update((k, _materialize(v)) for k, v in tree.items())
    return out
  if isinstance(tree, (list, tuple)):
    return type(tree)(_materialize(v) for v in tree)
  return tree
