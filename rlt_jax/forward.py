"""Inference in two phases, so each batch runs at shapes that fit its kept tokens.

Phase 1 (jit): normalise uint8 frames (the one place inference normalises) and apply the
policy: the keep mask stays on device, the exact kept counts (B,) come to the host. The host
`layout.plan`s the static sizes; phase 2 (jit, one compilation per plan) tokenises and runs
the model. Evaluation, predict and the benchmark all run through `Forward`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlt_jax import layout, rlt, sharding
from rlt_jax.models import vit


def batch_groups(mesh: jax.sharding.Mesh | None) -> int:
  """Batch shards of a mesh (data × fsdp): the layout's groups, so gathers stay on device."""
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def select(frames: jax.Array, policy: rlt.Policy, spec: vit.ModelSpec, *,
           rng: jax.Array | None = None, valid: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """uint8 frames → (normalised frames, keep mask (B, N), kept counts (B,)); in jit."""
  normalised = rlt.normalize(frames)
  mask = rlt.select(normalised, policy, tubelet_size=spec.tubelet_size,
                    patch_size=spec.patch_size, rng=rng, valid=valid)
  return normalised, mask, mask.sum(-1, dtype=jnp.int32)


class Forward:
  """Logits of uint8 clips under a token policy and layout, on a mesh (or one device)."""

  def __init__(self, model: vit.VisionTransformer, policy: rlt.Policy,
               token_layout: layout.Layout = layout.Layout(),
               mesh: jax.sharding.Mesh | None = None):
    self.model, self.policy, self.layout, self.mesh = model, policy, token_layout, mesh
    self.spec = model.spec
    self.groups = batch_groups(mesh)
    self.plans: set[layout.Plan] = set()
    replicated = None if mesh is None else NamedSharding(mesh, P())
    batch = None if mesh is None else sharding.batch_sharding(mesh)
    self._select = jax.jit(
        lambda frames, valid, rng: select(frames, policy, self.spec, rng=rng, valid=valid),
        out_shardings=None if mesh is None else (batch, batch, replicated))
    self._run = jax.jit(self._logits, static_argnums=3, out_shardings=replicated)

  def _logits(self, params, frames, mask, plan):
    tokens = layout.tokenize(frames, mask, plan, tubelet_size=self.spec.tubelet_size,
                             patch_size=self.spec.patch_size)
    return self.model.apply({"params": params}, tokens)

  def __call__(self, params: Any, frames: jax.Array | np.ndarray,
               valid: jax.Array | np.ndarray | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, np.ndarray, layout.Plan]:
    """(logits (B, classes) float32 on device, kept counts (B,) on host, the plan used).

    `frames` may be a global array already sharded over the mesh's batch axes.
    """
    if valid is None:
      valid = np.ones(frames.shape[0], bool)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    with _mesh(self.mesh):
      normalised, mask, counts = self._select(frames, valid, rng)
      counts = np.asarray(counts)
      plan = layout.plan(counts, self.layout, num_tokens=self.spec.num_tokens,
                         groups=self.groups)
      self.plans.add(plan)
      return self._run(params, normalised, mask, plan), counts, plan


def _mesh(mesh: jax.sharding.Mesh | None):
  """`jax.set_mesh(mesh)` (kernels such as splash shard_map over it), or nothing."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def order_by_cost(counts: np.ndarray) -> np.ndarray:
  """A permutation that puts clips of similar kept counts together (stable, ascending)."""
  return np.argsort(np.asarray(counts), kind="stable")
