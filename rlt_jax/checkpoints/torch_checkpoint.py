"""Reads PyTorch checkpoint files (.pth) into numpy, without torch and without running them.

A .pth file is a pickle, and unpickling can call anything the file names (os.system, eval…).
This reader resolves only the globals that rebuild tensors, storages, ordered dicts and
plain data; a file that names any other global is refused before anything in it is called.
Both layouts torch.save writes are read: the zip archive (torch ≥ 1.6) and the legacy
stream (magic number, sys info, pickle, storage keys, raw storages).

What `load` guarantees for any file, however it was made:
  * Nothing the file names runs but an allow-list of exact (module, name) pairs, each a
    stand-in here that checks its arguments (numpy dtypes and scalars are rebuilt from
    their bytes, never through numpy's own unpickling).
  * Every tensor view is checked against its storage before a byte is read through it:
    offset, sizes and strides ≥ 0, farthest element inside the storage, storage length equal
    to its element count × item size, known dtype.
  * The work is bounded (`Limits`): values visited (a shared value counts at every reference,
    so a "billion laughs" file is refused within milliseconds), nesting depth, tensors, and
    bytes held (a multiple of the file's size, so zero strides cannot blow a view up). Dict
    keys and set members must be small plain values, so hashing them is cheap.
  * Anything malformed (truncated, bad CRC, missing record, bad pickle) raises
    `CheckpointError`, a ValueError whose one-line message names the file and the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_MAX_KEY_VALUES = 64  # values in one dict key or set member (a str, or a small tuple)
_MAX_DIMS = 32
_INT64 = 2 ** 63


class CheckpointError(ValueError):
  """The file is not a well-formed checkpoint; the message names the file and the problem."""


class UnsafeCheckpointError(CheckpointError):
  """The file asks the unpickler for something other than tensors and plain data."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Bounds on what one file may make the reader do: far above any real checkpoint, far below
  what a small hostile file could otherwise demand."""
  max_objects: int = 10_000_000  # values visited; a value referenced n times counts n times
  max_depth: int = 100  # nesting of dicts, lists and tuples
  max_tensors: int = 1_000_000
  bytes_per_file_byte: int = 4  # bytes held (storages, arrays, tensors) per byte of the file…
  min_bytes: int = 64 << 20  # …or this many, if more


class _Work:
  """What one file has cost so far, checked against the limits at every step."""

  def __init__(self, source: str, limits: Limits, file_size: int):
    self.source, self.limits, self.file_size = source, limits, file_size
    self.max_bytes = max(limits.bytes_per_file_byte * file_size, limits.min_bytes)
    self.objects = self.bytes = self.tensors = 0

  def visit(self, count: int) -> None:
    self.objects += count
    if self.objects > self.limits.max_objects:
      raise CheckpointError(
          f"{self.source}: more than {self.limits.max_objects:,} values to visit (each "
          "reference to a shared value counts: a 'billion laughs' pickle?); refused")

  def hold(self, nbytes: int, what: str) -> None:
    self.bytes += nbytes
    if self.bytes > self.max_bytes:
      raise CheckpointError(
          f"{self.source}: {what} brings the data held to {self.bytes:,} bytes, more than "
          f"{self.max_bytes:,} ({self.limits.bytes_per_file_byte}× the file's "
          f"{self.file_size:,} bytes; views repeating data through zero strides?); refused")

  def tensor(self) -> None:
    self.tensors += 1
    if self.tensors > self.limits.max_tensors:
      raise CheckpointError(f"{self.source}: more than {self.limits.max_tensors:,} tensors; "
                            "refused")


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer; its bytes are read once the pickle has been parsed."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel, self.array = key, dtype, numel, None

  def describe(self) -> str:
    return f"storage '{self.key}' ({self.numel:,} {self.dtype} elements)"


class _Tensor:
  """A tensor view waiting for its storage (checked and materialised once storages are read)."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def materialize(self, source: str, where: str, work: _Work) -> np.ndarray:
    storage, offset, size, stride = self.storage, self.offset, self.size, self.stride
    name = f"tensor '{where}'" if where else "the top-level tensor"
    problem = None
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
      problem = "negative offset, size or stride"
    else:
      numel = math.prod(size)
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if numel and last >= storage.numel:
        problem = f"its farthest element {last:,} lies outside the storage"
      elif not numel and offset > storage.numel:
        problem = "its offset lies outside the storage"
    if problem:
      raise CheckpointError(f"{source}: {name} views {storage.describe()} at offset {offset} "
                            f"with size {size} and stride {stride}: {problem}; refused")
    itemsize = storage.dtype.itemsize
    work.hold(numel * itemsize, name)
    if not numel:
      return np.zeros(size, storage.dtype)
    view = np.lib.stride_tricks.as_strided(  # a size-1 dimension's stride is never used
        storage.array[offset:], shape=size,
        strides=[s * itemsize if n > 1 else 0 for n, s in zip(size, stride)])
    return np.array(view)


class _DType:
  """A pickled numpy dtype: a plain number type and a byte order, never numpy's own setstate
  (which trusts its flags and sizes)."""

  def __init__(self, source: str, spec: str):
    self.base = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 16 else None
    if self.base is None or self.base.kind not in "biufc":
      described = repr(spec[:20]) if isinstance(spec, str) else f"from a {type(spec).__name__}"
      raise CheckpointError(f"{source}: numpy dtype {described} is not a plain number type")
    self.order = "="

  def resolve(self) -> np.dtype:
    return self.base.newbyteorder(self.order)


class _Array:
  """A pickled numpy array: filled by its BUILD state, once."""
  value: np.ndarray | None = None


_NDARRAY = object()  # what `numpy.ndarray` resolves to: only `_reconstruct` accepts it


class Namespace(dict):
  """Stand-in for argparse.Namespace (training args stored beside weights): data only."""

  def __init__(self):
    super().__init__()


def _ints(value: Any, what: str, source: str) -> tuple[int, ...]:
  if not (isinstance(value, (tuple, list)) and len(value) <= _MAX_DIMS and all(
      isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64 for v in value)):
    raise CheckpointError(f"{source}: a tensor's {what} is not a short tuple of int64s")
  return tuple(value)


def _int(value: Any, what: str, source: str) -> int:
  if not (isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64):
    raise CheckpointError(f"{source}: {what} is a {type(value).__name__}, not an int64")
  return value


class _Unpickler(pickle._Unpickler):
  """The pure-Python unpickler, restricted. Pure Python because the C one hashes dict keys and
  set members, builds and mutates objects with no hook to check them first.

  Why a private CPython class: `pickle._Unpickler` is the only unpickler whose opcodes can be
  replaced one by one (its `dispatch` table maps each opcode byte to a method). We copy that
  table, send every opcode it does not know to `_unknown_opcode`, and replace the handlers of
  the opcodes that build containers and objects (below) with checked ones. It has been stable
  since Python 3.0; tests/test_convert.py runs hostile files through each replaced opcode, so a
  change in a new CPython shows up there, not in a user's run.
  """

  dispatch = collections.defaultdict(lambda: _Unpickler._unknown_opcode,
                                     pickle._Unpickler.dispatch)
  _GLOBALS = {
      ("collections", "OrderedDict"): "_ordered_dict",
      ("torch._utils", "_rebuild_tensor"): "_rebuild_tensor",
      ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor",
      ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
      ("torch", "Size"): "_size",
      ("argparse", "Namespace"): "_namespace",
      ("builtins", "set"): "_set", ("__builtin__", "set"): "_set",
      ("builtins", "frozenset"): "_frozenset", ("__builtin__", "frozenset"): "_frozenset",
      ("builtins", "bytes"): "_bytes", ("__builtin__", "bytes"): "_bytes",
      ("_codecs", "encode"): "_encode",
      ("numpy", "dtype"): "_dtype",
      ("numpy", "ndarray"): "_ndarray",
      ("numpy.core.multiarray", "scalar"): "_scalar",
      ("numpy._core.multiarray", "scalar"): "_scalar",
      ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
      ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
  }
  _namespace, _ndarray = Namespace, _NDARRAY

  def __init__(self, file: BinaryIO, source: str, work: _Work):
    super().__init__(file)
    self.source, self.work = source, work
    self.storages: dict[str, _Storage] = {}

  def error(self, message: str) -> CheckpointError:
    return CheckpointError(f"{self.source}: {message}")

  def find_class(self, module: str, name: str):
    if module == "torch" and name.endswith("Storage"):
      if name not in _STORAGE_DTYPES:
        raise self.error(f"unsupported storage type torch.{name:.40}; supported: "
                         f"{', '.join(_STORAGE_DTYPES)}")
      return _StorageType(name)
    if (module, name) in self._GLOBALS:
      return getattr(self, self._GLOBALS[(module, name)])
    raise UnsafeCheckpointError(
        f"{self.source}: the pickle asks for '{module:.60}.{name:.60}'; only tensors, dicts and "
        "plain data may be loaded, so this file was refused and nothing in it was run")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise self.error(f"unexpected persistent id (a {type(pid).__name__}); expected a "
                       "('storage', type, key, location, numel) tuple")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if len(pid) == 6 and pid[5] is not None:
      raise self.error("storage views (torch < 1.0 legacy files) are not supported")
    if not isinstance(storage_type, _StorageType):
      raise self.error(f"a storage of type {type(storage_type).__name__}, not a torch storage")
    if not (isinstance(key, str) and 0 < len(key) <= 64):
      raise self.error(f"a storage key that is not a short string (a {type(key).__name__})")
    numel = _int(numel, f"the element count of storage '{key}'", self.source)
    if numel < 0:
      raise self.error(f"storage '{key}' has a negative element count {numel}")
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype, numel)
    storage = self.storages[key]
    if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
      raise self.error(f"{storage.describe()} is also described as {numel:,} "
                       f"{storage_type.dtype} elements")
    return storage

  # The stand-ins for the allowed globals: each checks its arguments.

  def _rebuild_tensor(self, storage, offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
      raise self.error(f"a tensor over a {type(storage).__name__}, not a storage")
    size, stride = _ints(size, "size", self.source), _ints(stride, "stride", self.source)
    if len(size) != len(stride):
      raise self.error(f"a tensor over {storage.describe()} has size {size} but stride {stride}")
    self.work.tensor()
    return _Tensor(storage, _int(offset, "a tensor's offset", self.source), size, stride)

  @staticmethod
  def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data

  def _size(self, dims=()):
    return _ints(dims, "torch.Size", self.source)

  def _ordered_dict(self):  # torch writes OrderedDict() and fills it with SETITEMS
    return collections.OrderedDict()

  def _members(self, items) -> list:
    if not isinstance(items, (list, tuple)):
      raise self.error(f"a set built from a {type(items).__name__}")
    for item in items:
      self._check_key(item)
    return list(items)

  def _set(self, items=()):
    return set(self._members(items))

  def _frozenset(self, items=()):
    return frozenset(self._members(items))

  def _bytes(self):  # protocol 2 writes b"" as bytes(); bytes(n) would allocate n
    return b""

  def _encode(self, text, encoding="utf-8"):  # protocol 2 writes bytes as encode(str, 'latin1')
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
      raise self.error("_codecs.encode is accepted only for a str and encoding 'latin1'")
    return text.encode("latin-1")

  def _dtype(self, spec, align=False, copy=True):
    return _DType(self.source, spec)

  def _scalar(self, dtype, data):
    if not (isinstance(dtype, _DType) and isinstance(data, bytes)
            and len(data) == dtype.base.itemsize):
      raise self.error("a numpy scalar that is not a plain number type and its bytes")
    return np.frombuffer(data, dtype.resolve())[0]

  def _reconstruct(self, subtype, shape, typecode):
    if subtype is not _NDARRAY:
      raise self.error("numpy _reconstruct of something other than numpy.ndarray")
    return _Array()

  def _check_key(self, key: Any) -> None:
    """Dict keys and set members are hashed while loading (a tuple's hash walks all of it):
    only small plain values, so hashing is cheap."""
    todo, seen = [key], 0
    while todo:
      item = todo.pop()
      seen += 1
      if seen > _MAX_KEY_VALUES:
        raise self.error(f"a dict key or set member of more than {_MAX_KEY_VALUES} values")
      if isinstance(item, tuple):
        todo.extend(item)
      elif not isinstance(item, (str, bytes, int, float, type(None), np.generic)):
        raise self.error(f"a dict key or set member of type {type(item).__name__}; only "
                         "str, bytes, numbers, None and small tuples of them are accepted")
    self.work.visit(seen)

  # Opcodes that hash, mutate or set state, restricted to plain data.

  def _unknown_opcode(self):
    raise pickle.UnpicklingError("an unknown opcode")

  def _load_setitems(self):
    items = self.pop_mark()
    self._fill(self.stack[-1], items[0::2], items[1::2])

  def _load_setitem(self):
    value, key = self.stack.pop(), self.stack.pop()
    self._fill(self.stack[-1], [key], [value])

  def _load_dict(self):
    items = self.pop_mark()
    self.append({})
    self._fill(self.stack[-1], items[0::2], items[1::2])

  def _fill(self, target, keys, values) -> None:
    if not isinstance(target, dict):
      raise self.error(f"dict items added to a {type(target).__name__}")
    if len(keys) != len(values):
      raise self.error("a dict key without a value")
    for key, value in zip(keys, values):
      self._check_key(key)
      target[key] = value

  def _load_additems(self):
    items = self.pop_mark()
    if not isinstance(self.stack[-1], set):
      raise self.error(f"set items added to a {type(self.stack[-1]).__name__}")
    self.stack[-1].update(self._members(items))

  def _load_frozenset(self):
    items = self._members(self.pop_mark())  # pop_mark rebinds self.append: call it first
    self.append(frozenset(items))

  def _load_build(self):
    state = self.stack.pop()
    target = self.stack[-1]
    if isinstance(target, Namespace) and isinstance(state, dict):
      self._fill(target, list(state), list(state.values()))
    elif type(target) is collections.OrderedDict and isinstance(state, (dict, type(None))):
      pass  # attributes such as a state_dict's _metadata: not data anyone here reads
    elif isinstance(target, _DType):
      if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in tuple("<>|=")
              and state[2:5] == (None, None, None)):
        raise self.error(f"numpy dtype state that is not a plain number type's")
      target.order = state[1]
    elif isinstance(target, _Array) and target.value is None:
      target.value = self._array(state)
    else:
      raise self.error(f"object state set on a {type(target).__name__}")

  def _array(self, state) -> np.ndarray:
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)
            and isinstance(state[4], bytes)):
      raise self.error("a numpy array whose state is not (version, shape, dtype, fortran, bytes)")
    _, shape, dtype, fortran, data = state
    shape, dtype = _ints(shape, "numpy array shape", self.source), dtype.resolve()
    if min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != len(data):
      raise self.error(f"a numpy array of shape {shape} and dtype {dtype} with {len(data):,} "
                       "bytes of data")
    self.work.hold(len(data), "a numpy array")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()

  # the checked handlers (see the class docstring for why the table is patched)
  dispatch[pickle.SETITEM[0]] = _load_setitem
  dispatch[pickle.SETITEMS[0]] = _load_setitems
  dispatch[pickle.DICT[0]] = _load_dict
  dispatch[pickle.ADDITEMS[0]] = _load_additems
  dispatch[pickle.FROZENSET[0]] = _load_frozenset
  dispatch[pickle.BUILD[0]] = _load_build


def load(path: str | os.PathLike, limits: Limits = Limits()) -> Any:
  """The checkpoint's object tree with every tensor as a numpy array (dtype kept)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  work = _Work(path, limits, os.path.getsize(path))
  try:
    with open(path, "rb") as f:
      zipped = f.read(2) == b"PK"
      f.seek(0)
      tree = _load_zip(f, path, work) if zipped else _load_legacy(f, path, work)
    return _Materializer(path, work)(tree)
  except CheckpointError:
    raise
  except Exception as e:  # whatever the parsers raise on untrusted bytes: one clear line
    kind = ("a damaged zip archive" if isinstance(e, (zipfile.BadZipFile, zlib.error)) else
            "truncated, the data ends early" if isinstance(e, (EOFError, struct.error)) else
            "a malformed pickle" if isinstance(e, pickle.UnpicklingError) else
            "a malformed checkpoint")
    raise CheckpointError(f"{path}: {kind} ({type(e).__name__}: {str(e)[:200]})") from None


def _load_zip(f: BinaryIO, path: str, work: _Work) -> Any:
  try:
    archive = zipfile.ZipFile(f)
  except zipfile.BadZipFile as e:
    raise CheckpointError(f"{path}: a truncated or damaged zip archive ({e})") from None
  with archive:
    return _read_archive(archive, path, work)


def _read_archive(archive: zipfile.ZipFile, path: str, work: _Work) -> Any:
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("data.pkl")]
  if len(pickles) != 1:
    raise CheckpointError(f"{path}: a zip, but not a torch.save archive (no single data.pkl)")
  prefix = pickles[0][:-len("data.pkl")]

  def read(name: str, nbytes: int | None = None, what: str = "") -> bytes:
    """The record's bytes, its declared size checked before anything is inflated."""
    info = archive.getinfo(name)
    if nbytes is not None and info.file_size != nbytes:
      raise CheckpointError(f"{path}: {what} needs {nbytes:,} bytes, but its record {name} "
                            f"holds {info.file_size:,}")
    work.hold(info.file_size, f"record {name}")
    return archive.read(name)

  byteorder = prefix + "byteorder"
  if byteorder in names and read(byteorder).strip() != b"little":
    raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
  unpickler = _Unpickler(io.BytesIO(read(pickles[0])), path, work)
  tree = unpickler.load()
  for key, storage in unpickler.storages.items():
    name = f"{prefix}data/{key}"
    if name not in names:
      raise CheckpointError(f"{path}: no data record {name} for {storage.describe()}")
    raw = read(name, storage.numel * storage.dtype.itemsize, storage.describe())
    storage.array = np.frombuffer(raw, storage.dtype)
  return tree


def _load_legacy(f: BinaryIO, path: str, work: _Work) -> Any:
  plain = lambda: _Unpickler(f, path, work).load()
  try:
    magic = plain()
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the "
                          f"legacy format): {type(e).__name__}: {str(e)[:100]}") from None
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad magic number)")
  if plain() != 1001:
    raise CheckpointError(f"{path}: unsupported legacy checkpoint protocol")
  sys_info = plain()
  if not isinstance(sys_info, dict):
    raise CheckpointError(f"{path}: legacy header is a {type(sys_info).__name__}, not a dict")
  if not sys_info.get("little_endian", True):
    raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
  unpickler = _Unpickler(f, path, work)
  tree = unpickler.load()
  storages = unpickler.storages
  keys = plain()
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
          and sorted(keys) == sorted(storages)):
    raise CheckpointError(f"{path}: the legacy storage list does not match the "
                          f"{len(storages)} storages the tensors use")
  for key in keys:
    storage = storages[key]
    header = f.read(8)
    numel = int.from_bytes(header, "little", signed=True) if len(header) == 8 else None
    if numel != storage.numel:
      raise CheckpointError(f"{path}: truncated or inconsistent: {storage.describe()} has "
                            f"{'no data' if numel is None else f'{numel:,} elements'} in the file")
    nbytes = numel * storage.dtype.itemsize
    work.hold(nbytes, storage.describe())
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise CheckpointError(f"{path}: truncated: {storage.describe()} needs {nbytes:,} bytes, "
                            f"the file has {len(raw):,} left")
    storage.array = np.frombuffer(raw, storage.dtype)
  return tree


def _child(where: str, key: Any) -> str:
  key = str(key)[:60]
  return f"{where}/{key}" if where else key


class _Materializer:
  """Turns the unpickled tree into plain data: each shared object once, every visit counted."""

  _LEAVES = (str, bytes, int, float, type(None), np.generic, set, frozenset)

  def __init__(self, source: str, work: _Work):
    self.source, self.work = source, work
    self.done: dict[int, tuple[Any, int]] = {}  # id → (plain value, values a full walk visits)
    self.active: set[int] = set()

  def __call__(self, tree: Any) -> Any:
    return self._visit(tree, "", 0)[0]

  def _visit(self, obj: Any, where: str, depth: int) -> tuple[Any, int]:
    if isinstance(obj, self._LEAVES):
      self.work.visit(1)
      return obj, 1
    key = id(obj)
    if key in self.done:
      value, size = self.done[key]
      self.work.visit(size)
      return value, size
    if key in self.active:
      raise CheckpointError(f"{self.source}: '{where}' contains itself; refused")
    if depth > self.work.limits.max_depth:
      raise CheckpointError(f"{self.source}: nested more than {self.work.limits.max_depth} "
                            f"levels deep (at '{where[:80]}…'); refused")
    self.active.add(key)
    size = 1
    if isinstance(obj, dict):
      value = (Namespace() if isinstance(obj, Namespace) else
               collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {})
      for k, v in obj.items():
        value[k], n = self._visit(v, _child(where, k), depth + 1)
        size += n
    elif isinstance(obj, (list, tuple)):
      items = []
      for i, v in enumerate(obj):
        item, n = self._visit(v, _child(where, i), depth + 1)
        items.append(item)
        size += n
      value = items if isinstance(obj, list) else tuple(items)
    elif isinstance(obj, _Tensor):
      value = obj.materialize(self.source, where, self.work)
    elif isinstance(obj, _Storage):
      value = _Tensor(obj, 0, (obj.numel,), (1,)).materialize(self.source, where, self.work)
    elif isinstance(obj, _Array) and obj.value is not None:
      value = obj.value
    elif isinstance(obj, _DType):
      value = obj.resolve()
    else:
      raise CheckpointError(f"{self.source}: '{where}' holds a {type(obj).__name__}, which is "
                            "not data; refused")
    self.active.discard(key)
    self.work.visit(1)
    self.done[key] = value, size
    return value, size
