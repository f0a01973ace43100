"""Writes .pth files in both torch.save layouts without torch, for converter tests.

The pickles name the same globals torch does (torch._utils._rebuild_tensor_v2,
torch.HalfStorage, …); fake `torch` modules are registered only while pickling. `View` and
`write_raw` build files that lie (views past their storage, hand-made pickles) to test that
the reader refuses them.
"""

import collections
import contextlib
import dataclasses
import io
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np

STORAGES = {np.dtype(np.float16): "HalfStorage", np.dtype(np.float32): "FloatStorage",
            np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage"}
ITEMSIZE = {"HalfStorage": 2, "FloatStorage": 4, "BFloat16Storage": 2, "LongStorage": 8,
            "ComplexFloatStorage": 8}  # the last one: a type the reader does not know


@dataclasses.dataclass(frozen=True)
class View:
  """A tensor as torch pickles it, with any offset, size and stride over storage `key` of
  `numel` elements; the storage's bytes are given to write_pth(storages=…)."""
  key: str
  numel: int
  offset: int = 0
  size: tuple = ()
  stride: tuple = ()
  storage: str = "FloatStorage"


@dataclasses.dataclass(frozen=True)
class PlainArray:
  """A numpy array pickled the way numpy pickles it (data beside the weights, not a tensor)."""
  array: np.ndarray


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  storage: str
  numel: int


@contextlib.contextmanager
def fake_torch():
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in ITEMSIZE:
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield torch, utils
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _pickle(obj, records, legacy, protocol):
  """Pickles `obj`; records[key] = (storage type, bytes or None) for every storage it uses."""
  buffer = io.BytesIO()
  with fake_torch() as (torch, utils):

    class Pickler(pickle.Pickler):
      def reducer_override(self, o):
        if isinstance(o, np.ndarray):
          key, name = str(len(records)), STORAGES[o.dtype]
          records[key] = (name, np.ascontiguousarray(o).tobytes())
          stride = tuple(s // o.itemsize for s in np.ascontiguousarray(o).strides)
          return utils._rebuild_tensor_v2, (_StorageRef(key, name, o.size), 0, o.shape, stride,
                                            False, collections.OrderedDict())
        if isinstance(o, View):
          records.setdefault(o.key, (o.storage, None))
          return utils._rebuild_tensor_v2, (_StorageRef(o.key, o.storage, o.numel), o.offset,
                                            o.size, o.stride, False, collections.OrderedDict())
        if isinstance(o, PlainArray):
          return o.array.__reduce__()
        return NotImplemented

      def persistent_id(self, o):
        if isinstance(o, _StorageRef):
          pid = ("storage", getattr(torch, o.storage), o.key, "cpu", o.numel)
          return pid + (None,) if legacy else pid
        return None

    Pickler(buffer, protocol=protocol).dump(obj)
  return buffer.getvalue()


def write_pth(path, obj, legacy=False, protocol=2, storages=None):
  """torch.save(obj, path) for a tree of dicts, numpy arrays (fp16/fp32/bf16/int64 storages)
  and `View`s, whose storages' bytes come from `storages` (key → bytes; none: no record)."""
  records = {}
  payload = _pickle(obj, records, legacy, protocol)
  for key, (name, data) in records.items():
    records[key] = (name, data if data is not None else (storages or {}).get(key))
  write_raw(path, payload, {k: v for k, v in records.items() if v[1] is not None}, legacy)


def write_raw(path, payload, records=None, legacy=False):
  """A .pth file around any pickle `payload`; records: storage key → (storage type, bytes)."""
  records = records or {}
  if legacy:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                                    "little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(payload)
      pickle.dump(list(records), f, protocol=2)
      for name, data in records.values():
        f.write(np.int64(len(data) // ITEMSIZE[name]).tobytes())
        f.write(data)
    return
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
    for key, (_, data) in records.items():
      archive.writestr(f"archive/data/{key}", data)


def laughs(levels):
  """Protocol-2 opcodes that push t_levels, where t_0 = () and t_k = (t_k-1, t_k-1): a few
  bytes per level, 2^levels values for anyone who walks it without noticing the sharing."""
  ops = b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
  for i in range(levels):  # BINGET i twice, TUPLE2, BINPUT i+1, POP
    ops += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
  return ops + b"h" + bytes([levels])


def text(value):
  """Protocol-2 opcodes that push the str `value` (BINUNICODE)."""
  data = value.encode()
  return b"X" + len(data).to_bytes(4, "little") + data


class Hostile:
  """Unpickling this runs `touch MARKER` — if the reader lets it."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    import os
    return os.system, (f"touch {self.marker}",)


def write_hostile(path, marker, legacy=False):
  payload = pickle.dumps({"module": {"head.weight": Hostile(marker)}}, protocol=2)
  if legacy:
    with open(path, "wb") as f:
      f.write(payload)
  else:
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("archive/data.pkl", payload)
