"""How kept tokens are laid out in static shapes, so that compute follows the kept tokens.

RLT keeps a different number of tokens per clip (19%–96% on real video), but XLA compiles
static shapes. A batch of B clips is cut into G groups of b = B/G clips, one per batch shard
(so every gather below stays on its device), and each group's kept tokens are laid out as

  'stream'  one packed stream of L = S slots holding every kept token of the group in clip
            order, then padding. Token-wise layers (patch embedding, LayerNorms, qkv/proj,
            MLP: most of the FLOPs) run on the stream, so their cost follows the group's total
            kept count; attention gathers each clip's tokens into a row of C slots (C ≥ the
            batch's largest clip) and scatters the result back. The default.
  'padded'  one row of C slots per clip (L = b·C): simple, and what ToMe-style per-row
            methods need; cost follows the batch's busiest clip.

Either way a clip's logits equal those of its kept tokens alone: padding is never attended to
and never pooled. The static sizes come from the host `plan` of the batch's exact kept counts
(computed on device, then fetched): S from `stream_buckets` equal steps of b·N, C from
multiples of `capacity_step`, so a run compiles a bounded number of shapes. Nothing here is a
Flax module: `tokenize` turns normalised frames and a keep mask into a `TokenBatch` for any
model.

    counts = mask.sum(-1)                                  # device, then np.asarray(...)
    plan = layout.plan(counts, layout.Layout(), num_tokens=N, groups=G)
    tokens = layout.tokenize(frames, mask, plan, tubelet_size=2, patch_size=16)
"""

from __future__ import annotations

import dataclasses
import math

import einops
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import rlt

KINDS = ("stream", "padded")


@dataclasses.dataclass(frozen=True)
class Layout:
  """kind: 'stream' or 'padded'. capacity_step: C is a multiple of it (or N).
  stream_buckets: S is one of this many equal steps of b·N. capacity: a fixed C (one static
  shape, e.g. for TPU); a clip that keeps more is an error, never silently cut."""
  kind: str = "stream"
  capacity_step: int = 128
  stream_buckets: int = 16
  capacity: int | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"layout.kind={self.kind!r}: expected one of {KINDS}")
    for name in ("capacity_step", "stream_buckets"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"layout.{name}={value!r}: expected a positive int")
    if self.capacity is not None and (not isinstance(self.capacity, int) or self.capacity < 1):
      raise ValueError(f"layout.capacity={self.capacity!r}: expected a positive int or None")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static sizes of one batch: G groups of b clips, L slots per group, C slots per clip row."""
  kind: str
  groups: int
  clips: int
  length: int
  capacity: int
  num_tokens: int

  @property
  def slots(self) -> int:
    """Token slots the token-wise layers run on, over the whole batch."""
    return self.groups * self.length


def round_up(value: int, step: int) -> int:
  return -(-value // step) * step


def split_micro_batches(x, k: int):
  """(B, ...) → (k, B/k, ...): micro-batch j holds rows j, j + k, …, so that every device
  holds part of each (numpy or jax arrays). The one definition of the split."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1)


def merge_micro_batches(x: jax.Array) -> jax.Array:
  """The inverse of `split_micro_batches`: (k, B/k, ...) → (B, ...)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def needs(counts: np.ndarray, *, groups: int, micro_batches: int = 1) -> tuple[int, int, int]:
  """(clips per group, stream slots, row slots) that these exact kept counts need: the largest
  group's total and the largest clip (host side, numpy)."""
  counts = np.asarray(counts, np.int64)
  if counts.ndim != 1 or counts.shape[0] % (groups * micro_batches):
    raise ValueError(f"a batch of {counts.shape[0]} clips does not split into {groups} groups "
                     f"× {micro_batches} micro-batches")
  clips = counts.shape[0] // (groups * micro_batches)
  per_group = split_micro_batches(counts, micro_batches).reshape(micro_batches, groups, clips)
  return clips, int(per_group.sum(-1).max(initial=0)), int(counts.max(initial=0))


def plan(counts: np.ndarray, layout: Layout, *, num_tokens: int, groups: int,
         micro_batches: int = 1) -> Plan:
  """The smallest static sizes of `layout` that hold these exact kept counts (host side).

  `counts` (B,) are in global batch order; rows j, j+k, … form micro-batch j of k
  (`split_micro_batches`) and each micro-batch is cut into `groups` contiguous groups.
  """
  clips, slots, most = needs(counts, groups=groups, micro_batches=micro_batches)
  if layout.capacity is not None:
    if most > layout.capacity:
      raise OverflowError(
          f"a clip keeps {most} tokens, more than layout.capacity={layout.capacity}; raise "
          "it, unset it (capacity planned per batch), or cap clips with rlt.max_tokens")
    capacity = layout.capacity
  else:
    capacity = min(max(round_up(most, layout.capacity_step), layout.capacity_step), num_tokens)
  if layout.kind == "padded":
    length = clips * capacity
  else:
    step = max(1, -(-clips * num_tokens // layout.stream_buckets))
    length = min(max(round_up(slots, step), step), clips * num_tokens)
  return Plan(layout.kind, groups, clips, length, capacity, num_tokens)


def plan_flops(plan: Plan, width: int, mlp_dim: int) -> float:
  """FLOPs of one block at the plan's static shapes (token-wise layers on every slot,
  attention on every clip row)."""
  return block_flops(plan.slots, width, mlp_dim,
                     rows=np.full(plan.groups * plan.clips, plan.capacity))


@dataclasses.dataclass(frozen=True)
class ShapeSet:
  """A run's static shapes, fixed before it starts, so that it compiles each once.

  Each batch runs at the cheapest plan that holds its counts. The last plan holds every token
  of every clip, so no batch ever falls outside the set and no token is ever dropped.
  """
  plans: tuple[Plan, ...]  # cheapest first; the last holds any batch

  def fit(self, counts: np.ndarray) -> Plan:
    first = self.plans[0]
    _, slots, most = needs(counts, groups=first.groups,
                           micro_batches=len(counts) // (first.groups * first.clips))
    for p in self.plans:
      if p.capacity >= most and (p.kind == "padded" or p.length >= slots):
        return p
    raise OverflowError(f"a clip keeps {most} tokens, more than the largest planned row of "
                        f"{self.plans[-1].capacity} (layout.capacity)")

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(p) for p in self.plans]

  @classmethod
  def from_json(cls, plans: list[dict]) -> "ShapeSet":
    return cls(tuple(Plan(**p) for p in plans))


def choose_shapes(samples: list[np.ndarray], layout: Layout, *, num_tokens: int, groups: int,
                  micro_batches: int = 1, max_shapes: int = 16, width: int, mlp_dim: int
                  ) -> ShapeSet:
  """At most `max_shapes` plans that run these sample batches' counts in the fewest FLOPs.

  Greedy: start from the plan that holds anything (every token of every clip), then add, one
  at a time, the candidate that saves the most FLOPs over the samples; candidates combine
  every stream length and row capacity the samples' own exact plans use.
  """
  if max_shapes < 1:
    raise ValueError(f"layout.shapes={max_shapes!r}: expected a positive int")
  exact = [plan(c, layout, num_tokens=num_tokens, groups=groups, micro_batches=micro_batches)
           for c in samples]
  first = exact[0]
  full_capacity = layout.capacity or num_tokens
  full = Plan(layout.kind, groups, first.clips,
              first.clips * (full_capacity if layout.kind == "padded" else num_tokens),
              full_capacity, num_tokens)
  candidates = {dataclasses.replace(full, length=length, capacity=capacity)
                for length in {p.length for p in exact} for capacity in {p.capacity for p in exact}
                if layout.kind == "stream" or length == first.clips * capacity} - {full}
  cost = {p: plan_flops(p, width, mlp_dim) for p in candidates | {full}}
  holds = {p: np.array([q.length <= p.length and q.capacity <= p.capacity for q in exact])
           for p in candidates}
  best = np.full(len(exact), cost[full])
  chosen = [full]
  while len(chosen) < max_shapes and candidates:
    gains = {p: float(np.sum(np.where(holds[p], np.maximum(best - cost[p], 0), 0)))
             for p in candidates}
    pick = max(gains, key=lambda p: (gains[p], -cost[p]))
    if gains[pick] <= 0:
      break
    best = np.where(holds[pick], np.minimum(best, cost[pick]), best)
    chosen.append(pick)
    candidates.discard(pick)
  return ShapeSet(tuple(sorted(chosen, key=lambda p: cost[p])))


@flax.struct.dataclass
class TokenBatch:
  """The kept tokens of B = G·b clips, in G groups of L slots.

  patches (G, L, ts·p·p·3) normalised pixels (zeros in padding); positions (G, L) each token's
  flat (t, y, x) index in its clip; lengths (G, L) its run length in tubelets; clip (G, L) the
  clip's index in its group + 1 (0: padding); kept (B,) tokens per clip. 'stream' only:
  rows (G, b, C) the slot of each clip's c-th token (L: none), slots (G, L) the row position
  b'·C + c of each slot (b·C: padding).
  """
  patches: jax.Array
  positions: jax.Array
  lengths: jax.Array
  clip: jax.Array
  kept: jax.Array
  rows: jax.Array | None = None
  slots: jax.Array | None = None
  plan: Plan = flax.struct.field(pytree_node=False, default=None)


def patchify(frames: jax.Array, tubelet_size: int, patch_size: int) -> jax.Array:
  """(B, T, H, W, C) → (B, N, ts·p·p·C) in (t, y, x) token order, Conv3d kernel order inside."""
  return einops.rearrange(frames, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)",
                          pt=tubelet_size, ph=patch_size, pw=patch_size)


def tokenize(frames: jax.Array, mask: jax.Array, plan: Plan, *, tubelet_size: int,
             patch_size: int) -> TokenBatch:
  """Normalised frames (B, T, H, W, 3) and their keep mask (B, N) → a TokenBatch (in jit).

  Every kept token is placed (the plan holds the exact counts); order within a clip is kept.
  """
  grid = rlt.token_grid(frames.shape, tubelet_size, patch_size)
  batch, n = mask.shape
  if n != math.prod(grid) or batch != plan.groups * plan.clips:
    raise ValueError(f"mask {mask.shape} does not fit frames {frames.shape} and {plan}")
  g, b, length, capacity = plan.groups, plan.clips, plan.length, plan.capacity
  patches = patchify(frames, tubelet_size, patch_size).reshape(g, b * n, -1)
  lengths = rlt.run_lengths(mask.reshape(batch, *grid)).reshape(g, b * n)
  mask = mask.reshape(g, b, n)
  counts = mask.sum(-1, dtype=jnp.int32)
  rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
  if plan.kind == "stream":
    offsets = jnp.cumsum(counts, axis=-1, dtype=jnp.int32) - counts
    dest = offsets[..., None] + rank
  else:
    dest = jnp.arange(b, dtype=jnp.int32)[:, None] * capacity + rank
  dest = jnp.where(mask & (rank < capacity), dest, length).reshape(g, b * n)

  def place(dest_g):
    return jnp.full((length + 1,), b * n, jnp.int32).at[dest_g].set(
        jnp.arange(b * n, dtype=jnp.int32))[:length]

  source = jax.vmap(place)(dest)  # (G, L): the token each slot holds; b·N: none
  valid = source < b * n
  take = jax.vmap(lambda x, i: x[i])
  pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  tokens = TokenBatch(
      patches=take(pad(patches), source),
      positions=jnp.where(valid, source % n, 0),
      lengths=take(pad(lengths), source),
      clip=jnp.where(valid, source // n + 1, 0),
      kept=counts.reshape(batch), plan=plan)
  if plan.kind == "padded":
    return tokens
  c = jnp.arange(capacity, dtype=jnp.int32)
  rows = jnp.where(c < counts[..., None], offsets[..., None] + c, length)
  owner = jnp.maximum(tokens.clip - 1, 0)
  within = jnp.arange(length, dtype=jnp.int32) - take(offsets, owner)
  slots = jnp.where(valid, owner * capacity + within, b * capacity)
  return tokens.replace(rows=rows, slots=slots)


@jax.custom_vjp
def _permute(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[g, k] = x[g, index[g, k]], zero where the index is out of range (padding).

  `index` and `inverse` are one-to-one inverses on the entries that hold tokens, so the
  transpose (the backward pass) is the same gather with `inverse`: no scatter-add, whose
  padding entries would all add into one slot (serialised atomics on a GPU).
  """
  return jax.vmap(lambda xg, i: xg.at[i].get(mode="fill", fill_value=0))(x, index)


def _permute_forward(x, index, inverse):
  return _permute(x, index, inverse), (index, inverse)


def _permute_backward(residuals, g):
  index, inverse = residuals
  return _permute(g, inverse, index), None, None


_permute.defvjp(_permute_forward, _permute_backward)


def to_rows(x: jax.Array, tokens: TokenBatch) -> jax.Array:
  """(G, L, ...) slots → (G·b, C, ...) one row per clip, valid slots first (padding zero)."""
  p = tokens.plan
  if p.kind == "padded":
    return x.reshape(p.groups * p.clips, p.capacity, *x.shape[2:])
  rows = _permute(x, tokens.rows.reshape(p.groups, -1), tokens.slots)
  return rows.reshape(p.groups * p.clips, p.capacity, *x.shape[2:])


def from_rows(y: jax.Array, tokens: TokenBatch) -> jax.Array:
  """The inverse of `to_rows` on the slots that hold tokens (padding slots get zeros)."""
  p = tokens.plan
  if p.kind == "padded":
    return y.reshape(p.groups, p.length, *y.shape[2:])
  y = y.reshape(p.groups, p.clips * p.capacity, *y.shape[2:])
  return _permute(y, tokens.slots, tokens.rows.reshape(p.groups, -1))


def pool(x: jax.Array, tokens: TokenBatch) -> jax.Array:
  """Mean of each clip's tokens (B, D) in float32: padding never counts."""
  p = tokens.plan
  one_hot = tokens.clip[..., None] == jnp.arange(1, p.clips + 1)
  sums = jnp.einsum("glb,gld->gbd", one_hot.astype(jnp.float32), x.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).reshape(p.groups * p.clips, -1)
  return sums / jnp.maximum(tokens.kept, 1)[:, None].astype(jnp.float32)


def block_flops(slots, width: int, mlp_dim: int, rows=None) -> float:
  """FLOPs (2 per multiply-add) of one transformer block: the qkv, proj and MLP matmuls on all
  `slots` (token slots, a count or per-clip counts) and attention's two matmuls on each of the
  `rows` (row lengths; default: every clip's own tokens, no padding)."""
  slots = np.asarray(slots, np.float64)
  rows = slots if rows is None else np.asarray(rows, np.float64)
  return float(2 * slots.sum() * (4 * width * width + 2 * width * mlp_dim)
               + 4 * np.sum(rows * rows) * width)


def ideal_flops_ratio(counts: np.ndarray, num_tokens: int, width: int, mlp_dim: int) -> float:
  """FLOPs of every clip's own kept tokens over FLOPs of all tokens (per transformer block)."""
  counts = np.asarray(counts)
  return (block_flops(counts, width, mlp_dim)
          / block_flops(np.full(len(counts), num_tokens), width, mlp_dim))


def plan_flops_ratio(plan: Plan, width: int, mlp_dim: int) -> float:
  """FLOPs the plan's static shapes run, over FLOPs of all tokens of its clips."""
  batch = plan.groups * plan.clips
  return plan_flops(plan, width, mlp_dim) / block_flops(np.full(batch, plan.num_tokens), width,
                                                        mlp_dim)
