"""The device mesh, FSDP-style parameter sharding rules, and global batches.

Mesh axes (`AXES`, named nowhere else): `data` (pure data parallelism) and `fsdp` (data
parallelism whose members also split parameters and optimizer state); there is no
tensor-parallel axis (a ViT-g fits with FSDP). A batch is split over (data, fsdp), and each
batch shard is one group of the token layout. A parameter with at least `min_size` elements is
split over `fsdp` along its largest dimension that divides evenly, so ViT-H and ViT-g fit;
small ones (biases, norms) are replicated. Axes are Auto (GSPMD), which flax.linen needs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")  # the mesh's axes; a batch is split over both (the one place named)
BATCH = P(AXES)


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: list[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices; one size may be -1 (whatever is left)."""
  devices = devices if devices is not None else jax.devices()
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {len(devices)} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"there are {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2 ** 16) -> P:
  """Split the largest evenly divisible dimension over `fsdp` (big arrays only)."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree: Any, min_size: int = 2 ** 16) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) by the FSDP rule."""
  fsdp = mesh.shape[AXES[1]]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), tree)


def batch_shards(mesh: Mesh | None) -> int:
  """How many shards a batch is split into on `mesh` (1 without one): the token layout's
  groups, so that its gathers stay on each device."""
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows → one global array per key, split over (data, fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
