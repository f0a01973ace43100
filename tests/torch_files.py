"""Writes .pth files in both torch.save layouts without torch, for converter tests.

The pickles name the same globals torch does (torch._utils._rebuild_tensor_v2,
torch.HalfStorage, …); fake `torch` modules are registered only while pickling.
"""

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np

STORAGES = {np.dtype(np.float16): "HalfStorage", np.dtype(np.float32): "FloatStorage",
            np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage"}


@contextlib.contextmanager
def fake_torch():
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in STORAGES.values():
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


def _pickle(obj, storages, legacy):
  buffer = io.BytesIO()
  with fake_torch() as (torch, utils):

    class Pickler(pickle.Pickler):
      def reducer_override(self, o):
        if isinstance(o, np.ndarray):
          key = str(len(storages))
          storages.append((key, np.ascontiguousarray(o)))
          stride = tuple(s // o.itemsize for s in np.ascontiguousarray(o).strides)
          return utils._rebuild_tensor_v2, (("storage-ref", key, o.dtype, o.size), 0, o.shape,
                                            stride, False, collections.OrderedDict())
        return NotImplemented

      def persistent_id(self, o):
        if isinstance(o, tuple) and o and o[0] == "storage-ref":
          cls = getattr(torch, STORAGES[np.dtype(o[2])])
          pid = ("storage", cls, o[1], "cpu", o[3])
          return pid + (None,) if legacy else pid
        return None

    Pickler(buffer, protocol=2).dump(obj)
  return buffer.getvalue()


def write_pth(path, obj, legacy=False):
  """torch.save(obj, path) for a tree of dicts and numpy arrays (fp16/fp32/bf16 storages)."""
  storages = []
  payload = _pickle(obj, storages, legacy)
  if legacy:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                                    "little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(payload)
      pickle.dump([key for key, _ in storages], f, protocol=2)
      for _, array in storages:
        f.write(np.int64(array.size).tobytes())
        f.write(array.tobytes())
    return
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
    for key, array in storages:
      archive.writestr(f"archive/data/{key}", array.tobytes())


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
