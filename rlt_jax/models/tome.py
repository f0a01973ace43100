"""Token Merging (ToMe; Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster") for
video ViTs without a class token, in static shapes, on per-clip rows with padding.

Each block merges r of its row's tokens into others after attention, so later blocks (and the
MLP of this one) run on fewer tokens. Merged tokens are size-weighted averages; a token's size
(how many input tokens it stands for) then enters attention as a log-size bias ("proportional
attention"), so a merged token is attended to like the copies it replaced, and pooling is
size-weighted. Pure functions of jnp arrays, no Flax. How a block uses it:

    size = valid.astype(jnp.float32)                   # once, before the first block
    for r_l in schedule(r, depth, N):                  # static ints
      y, k = attn(LN1(x), bias=attention_bias(size))   # k: (B, N_l, heads, head_dim) keys
      x = x + y
      m = bipartite_soft_matching(metric_from_keys(k), size > 0, r_l)
      x, size = merge(x, size, m)                      # (B, N_l - r_l, D), (B, N_l - r_l)
      x = x + mlp(LN2(x))
    pooled = weighted_mean(x, size)                    # (B, D): replaces the plain mean

What it needs from the layout: one clip per row, x (B, N, D) with a valid mask (B, N) (the
'padded' layout; a packed stream must be gathered into per-clip rows first, since matching
inside a row would merge tokens of different clips). Valid tokens may sit anywhere in the row.
Skip the calls at r_l = 0 so that logits are bitwise those without ToMe (`merge` is the
identity there anyway). Anything else kept per token (segment ids, positions) follows the
merge through `reorder`; the row's padding is `size == 0` after every merge.

Matching, per row, is the published bipartite soft matching applied to the row's valid tokens
alone, in row order, so a row gives exactly what the reference code gives for its clip:
  1. the valid tokens, in row order, are split alternately into A (even) and B (odd);
  2. each A token's best B match by cosine similarity of the metric (keys averaged over heads);
  3. the min(r, n // 2) A tokens (n = valid tokens) with the highest best-match scores are
     merged into their matches, the rest of A is kept.
Padding fills the rest of the r static merges: padding slots are appended to A and B after
the valid tokens, score -inf, are never a match, and merge (size 0, adding exactly nothing)
into padding of B, so they only move padding around. Output order, as in the paper's code:
the kept A tokens in A order (the reference keeps them in score order unless there is a class
token; row order is deterministic and keeps the valid tokens' relative order, so every later
step also equals the reference on its clip), then all of B in B order; padding gathers after
the valid tokens of each part. One exception, only when the schedule is not respected: at
r = N / 2 on an even row with an odd number of valid tokens, A has neither padding left to
fill the merges with nor room for a kept token, so the valid A token the reference keeps is
moved, unmerged, to the first padding slot of B: the tokens are still the reference's, but
that one comes last. `schedule` keeps r_l <= (N_l - 1) // 2, which rules this out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Merge(NamedTuple):
  """The outcome of one matching: where each output slot's tokens come from (a pytree).

  The output row is `unmerged` then `b`, N - r slots; all entries are row positions (int32).
  unmerged (B, ceil(N/2) - r): the A tokens kept as they are, in A order.
  b (B, N // 2): the B tokens, in B order; each is the merge target of zero or more of:
  src (B, r): the A tokens merged away, each into b[dst] (dst (B, r) indexes `b`, not the row);
  those of size 0 (padding) add nothing, and one that lands on padding of B is just moved.
  At r = 0, unmerged is every position in row order and src, dst, b are empty.
  """
  unmerged: jax.Array
  src: jax.Array
  dst: jax.Array
  b: jax.Array

  @property
  def r(self) -> int:
    return self.src.shape[-1]


def bipartite_soft_matching(metric: jax.Array, valid: jax.Array, r: int) -> Merge:
  """Which r tokens of each row merge into which (module docstring). metric (B, N, C): the
  keys averaged over heads (`metric_from_keys`); valid (B, N) bool; r: a static int <= N // 2.

  Matching is computed in float32 with exact matmuls, so rankings do not depend on the backend's
  default matmul precision. It has no gradient (it returns indices only).
  """
  rows, length = valid.shape
  if not 0 <= r <= length // 2:
    raise ValueError(f"ToMe r={r} on rows of {length} tokens: expected 0 <= r <= {length // 2}")
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  if r == 0:
    empty = jnp.zeros((rows, 0), jnp.int32)
    return Merge(unmerged=positions, src=empty, dst=empty, b=empty)
  size_a, size_b = (length + 1) // 2, length // 2

  # Valid tokens first, each group in row order; then A = even, B = odd places of that order.
  # Valid A are then A[:ceil(n/2)] and valid B are B[:n // 2].
  order = _valid_first(valid)
  a_pos, b_pos = order[:, 0::2], order[:, 1::2]
  a_valid, b_valid = _take(valid, a_pos), _take(valid, b_pos)

  metric = jnp.where(valid[..., None], metric.astype(jnp.float32), 0.0)  # padding may be junk
  norm = jnp.linalg.norm(metric, axis=-1, keepdims=True)
  metric = metric / jnp.where(norm > 0, norm, 1.0)
  scores = jnp.einsum("bic,bjc->bij", _take(metric, a_pos), _take(metric, b_pos),
                      precision=jax.lax.Precision.HIGHEST)
  scores = jnp.where(a_valid[:, :, None] & b_valid[:, None, :], scores, -jnp.inf)
  node_max = scores.max(axis=-1)
  # A valid token's match is its best valid B (B[0], padding, when the row has no valid B);
  # padding A[i] goes to B[i] (or the last B), which is padding unless the whole of B is valid.
  pad_match = jnp.minimum(jnp.arange(size_a, dtype=jnp.int32), size_b - 1)
  node_idx = jnp.where(a_valid, scores.argmax(axis=-1).astype(jnp.int32), pad_match[None, :])

  # Merge order: the best min(r, n // 2) valid A, then padding A (A[num_a:], in order), then,
  # only if padding runs out (see the module docstring), the valid A the reference keeps.
  # top_k breaks ties towards the lower index, and padding (-inf) ranks after every valid A
  # (a lone valid token, with no valid B and so -inf too, is A[0] and comes first).
  best = jax.lax.top_k(node_max, r)[1].astype(jnp.int32)  # (B, r)
  num = valid.sum(axis=-1, dtype=jnp.int32)[:, None]
  num_a, num_merged = (num + 1) // 2, jnp.minimum(r, num // 2)
  padding_a = size_a - num_a
  k = jnp.arange(r, dtype=jnp.int32)[None, :]
  extra = k - num_merged
  overflow = jnp.clip(num_merged + extra - padding_a, 0, r - 1)
  src_a = jnp.where(extra < 0, best,
                    jnp.where(extra < padding_a, num_a + extra, _take(best, overflow)))

  # Such an overflowing A token is not merged but moved to B's first padding slot, B[n // 2]
  # (it exists whenever padding runs out), so the row's tokens stay the reference's.
  dst = jnp.where(extra >= padding_a, jnp.minimum(num // 2, size_b - 1), _take(node_idx, src_a))

  merged = jnp.zeros((rows, size_a), bool).at[_rows(rows), src_a].set(True)
  kept_a = _compact(~merged, size_a - r)
  return Merge(unmerged=_take(a_pos, kept_a), src=_take(a_pos, src_a), dst=dst, b=b_pos)


def merge(x: jax.Array, size: jax.Array, m: Merge) -> tuple[jax.Array, jax.Array]:
  """Merge the tokens of x (B, N, D) as m says: (x', size'), shapes (B, N - r, ...).

  Each output token is the size-weighted mean of its group, sum(x * size) / sum(size), its size
  the group's total, so sum(x * size) and sum(size) of every row are preserved. Sums are taken
  in float32 (x' is cast back to x.dtype). Tokens nothing (of positive size) merges into pass
  through bitwise; padding slots have size 0 and x' = 0, whatever x held there. r = 0 returns
  the inputs themselves.
  """
  if m.r == 0:
    return x, size
  acc = jnp.promote_types(x.dtype, jnp.float32)
  live = size > 0
  weight = jnp.where(live, size, 0).astype(acc)
  xw = jnp.where(live[..., None], x.astype(acc) * weight[..., None], 0.0)  # padding: exact 0
  rows = _rows(x.shape[0])
  total = _take(xw, m.b).at[rows, m.dst].add(_take(xw, m.src))
  total_size = _take(weight, m.b).at[rows, m.dst].add(_take(weight, m.src))
  received = jnp.zeros(m.b.shape, bool).at[rows, m.dst].max(_take(live, m.src))
  x_b = jnp.where(received[..., None],
                  (total / jnp.where(total_size > 0, total_size, 1.0)[..., None]).astype(x.dtype),
                  _take(x, m.b))
  x_new = jnp.concatenate([_take(x, m.unmerged), x_b], axis=1)
  size_new = jnp.concatenate([_take(weight, m.unmerged), total_size], axis=1)
  x_new = jnp.where(size_new[..., None] > 0, x_new, jnp.zeros((), x.dtype))
  return x_new, size_new.astype(size.dtype)


def reorder(values: jax.Array, m: Merge) -> jax.Array:
  """Any per-token array (B, N, ...) laid out like merge's output: each slot takes the value of
  the token it keeps (a B token keeps its own). For things that are equal within a merge group,
  e.g. a clip's segment id."""
  if m.r == 0:
    return values
  return jnp.concatenate([_take(values, m.unmerged), _take(values, m.b)], axis=1)


def metric_from_keys(k: jax.Array) -> jax.Array:
  """The matching metric of the paper's code: attention keys (B, N, heads, head_dim) averaged
  over heads, (B, N, head_dim)."""
  return k.mean(axis=-2)


def attention_bias(size: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Proportional attention: a (B, N) bias to add to the attention logits of each key,
  logits[b, h, q, k] + bias[b, k]. log(size) makes a token of size s weigh as s copies of
  itself; size 0 (padding) gets half the dtype's lowest value, finite, so it gets exactly zero
  weight next to any real key yet a row of padding keys still has a finite softmax."""
  size = size.astype(dtype)
  return jnp.where(size > 0, jnp.log(jnp.where(size > 0, size, 1)), jnp.finfo(dtype).min / 2)


def weighted_mean(x: jax.Array, size: jax.Array) -> jax.Array:
  """Size-weighted mean over tokens, (B, N, D) → (B, D) float32: the mean of the tokens the row
  stood for before merging. Padding (size 0) is ignored; an empty row gives zeros."""
  weight = jnp.where(size > 0, size, 0).astype(jnp.float32)
  total = jnp.einsum("bnd,bn->bd", jnp.where(size[..., None] > 0, x, 0).astype(jnp.float32),
                     weight, precision=jax.lax.Precision.HIGHEST)
  count = weight.sum(axis=-1, keepdims=True)
  return total / jnp.where(count > 0, count, 1.0)


def schedule(r: int | Sequence[int], depth: int, tokens: int, *,
             min_tokens: int = 1) -> tuple[int, ...]:
  """Static per-block r for rows of `tokens` slots: a constant r, or one r per block.

  Each r_l is clipped to (N_l - 1) // 2, N_l the block's input row length, so every block keeps
  more than half its row (the paper's cap is N_l // 2; one less keeps matching equal to the
  reference for every clip, see the module docstring), and to N_l - min_tokens.
  """
  if isinstance(r, int):
    per_layer = [r] * depth
  else:
    per_layer = [int(v) for v in r]
    if len(per_layer) != depth:
      raise ValueError(f"ToMe r has {len(per_layer)} entries for {depth} blocks")
  if any(v < 0 for v in per_layer):
    raise ValueError(f"ToMe r={r!r}: expected non-negative values")
  if tokens < 1 or min_tokens < 1:
    raise ValueError(f"ToMe schedule over {tokens} tokens keeping {min_tokens}: expected >= 1")
  out, n = [], tokens
  for v in per_layer:
    v = max(0, min(v, (n - 1) // 2, n - min_tokens))
    out.append(v)
    n -= v
  return tuple(out)


def token_counts(tokens: int, r_schedule: Sequence[int]) -> tuple[int, ...]:
  """Row length at each block's input and after the last: (N_0 = tokens, ..., N_depth), so
  block l's attention runs on N_l tokens, its MLP on N_{l+1}, and pooling on N_depth."""
  counts = [tokens]
  for v in r_schedule:
    counts.append(counts[-1] - v)
  return tuple(counts)


def _rows(batch: int) -> jax.Array:
  return jnp.arange(batch, dtype=jnp.int32)[:, None]


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
  """values[b, index[b, j], ...] per row: (B, N, ...) by (B, M) → (B, M, ...)."""
  index = index.reshape(index.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


def _valid_first(valid: jax.Array) -> jax.Array:
  """Row positions (B, N), valid ones first, each group in row order: a stable partition (one
  scatter rather than a sort)."""
  rows, length = valid.shape
  v = valid.astype(jnp.int32)
  dest = jnp.where(valid, jnp.cumsum(v, axis=-1) - 1,
                   v.sum(axis=-1, keepdims=True) + jnp.cumsum(1 - v, axis=-1) - 1)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  return jnp.zeros_like(positions).at[_rows(rows), dest].set(positions, unique_indices=True)


def _compact(keep: jax.Array, count: int) -> jax.Array:
  """Indices (B, count) of the True entries of keep (B, M), in order; each row has `count`."""
  rows, length = keep.shape
  dest = jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1, count)  # count: dropped
  indices = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  return jnp.zeros((rows, count), jnp.int32).at[_rows(rows), dest].set(indices, mode="drop")
