"""Inference in two phases, so each batch runs at shapes that fit its kept tokens.

Phase 1 (jit): normalise uint8 frames (the one place inference normalises) and apply the
policy: the keep mask stays on device, the exact kept counts (B,) come to the host. The host
`layout.plan`s the static sizes; phase 2 (compiled once per plan) tokenises and runs the
model. Both run through the shared `two_phase.TwoPhase` driver. Evaluation, predict and the
benchmark all run through `Forward`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlt_jax import layout, rlt
from rlt_jax.models import vit
from rlt_jax.runtime import sharding
from rlt_jax.training import two_phase


def mask_clips(frames: jax.Array, policy: rlt.Policy, spec: vit.ModelSpec, *,
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
    self.groups = sharding.batch_shards(mesh)
    replicated = None if mesh is None else NamedSharding(mesh, P())
    batch = None if mesh is None else sharding.batch_sharding(mesh)
    self.driver = two_phase.TwoPhase(
        self._select, self._logits, self._plan, mesh=mesh,
        first_shardings=None if mesh is None else ((batch, batch), replicated),
        second_shardings=replicated)

  @property
  def plans(self) -> set[layout.Plan]:
    return self.driver.plans

  def _select(self, frames, valid, rng):
    normalised, mask, counts = mask_clips(frames, self.policy, self.spec, rng=rng, valid=valid)
    # the patch embedding casts its input to the model's dtype: casting here halves phase 2's
    # input (bf16) and changes nothing; the mask was decided on float32 values
    return (normalised.astype(self.model.dtype), mask), counts

  def _plan(self, counts: np.ndarray) -> layout.Plan:
    return layout.plan(counts, self.layout, num_tokens=self.spec.num_tokens, groups=self.groups)

  def _logits(self, params, prepared, plan):
    frames, mask = prepared
    tokens = layout.tokenize(frames, mask, plan, tubelet_size=self.spec.tubelet_size,
                             patch_size=self.spec.patch_size)
    return self.model.apply({"params": params}, tokens)

  def begin(self, frames: jax.Array | np.ndarray, valid: jax.Array | np.ndarray | None = None,
            rng: jax.Array | None = None) -> two_phase.Pending:
    """Phase 1 dispatched (normalise, mask, counts); `finish` runs the model."""
    if valid is None:
      valid = np.ones(frames.shape[0], bool)
    return self.driver.begin(frames, valid, jax.random.PRNGKey(0) if rng is None else rng)

  def finish(self, params: Any, pending: two_phase.Pending
             ) -> tuple[jax.Array, np.ndarray, layout.Plan]:
    logits, plan = self.driver.finish(params, pending)
    return logits, pending.host_counts(), plan

  def __call__(self, params: Any, frames: jax.Array | np.ndarray,
               valid: jax.Array | np.ndarray | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, np.ndarray, layout.Plan]:
    """(logits (B, classes) float32 on device, kept counts (B,) on host, the plan used).

    `frames` may be a global array already sharded over the mesh's batch axes.
    """
    return self.finish(params, self.begin(frames, valid, rng))

  def map(self, params: Any, batches: Iterable[dict[str, Any]]
          ) -> Iterator[tuple[dict[str, Any], jax.Array, np.ndarray, layout.Plan]]:
    """(batch, logits, counts, plan) for each batch of "frames" and "valid", in order; phase 1
    of the next batch is dispatched before phase 2 of this one, so planning overlaps work."""
    previous = None
    for batch in batches:
      pending = self.begin(batch["frames"], batch.get("valid"))
      if previous is not None:
        yield previous[0], *self.finish(params, previous[1])
      previous = batch, pending
    if previous is not None:
      yield previous[0], *self.finish(params, previous[1])
