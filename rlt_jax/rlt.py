"""Run-Length Tokenization: which tokens of a clip to keep, and how to batch them.

The rule is the official release's, token for token (see shared/specs/rlt.md): tubelet j at
patch (y, x) is kept when the mean absolute difference between frame (j+1)·ts−1 and frame
(j−1)·ts over that patch exceeds τ (strictly); the first tubelet is always kept.

Kept counts vary per clip, but XLA wants static shapes, so kept tokens are compacted into
rows of a fixed length with segment ids: one clip per row padded to a capacity, or several
clips packed per row. Either way a clip's logits equal those of the model run on its kept
tokens alone; padding is never attended to and never pooled.

`keep_mask`, `change_scores`, `run_lengths`, `capacity_buckets`, `choose_capacity` and
`pack_rows_needed` accept numpy arrays (host side, e.g. in the input pipeline) as well as jax
arrays (inside jit); `select_tokens` and `compact` run inside jit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import einops
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POLICIES = ("none", "rlt", "random")
OVERFLOW_POLICIES = ("error", "drop_least_changed", "full")

Array = Any  # np.ndarray or jax.Array


def _xp(x: Array):
  """numpy for numpy inputs (host side), jax.numpy otherwise (jit side)."""
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def normalize(frames: Array) -> Array:
  """uint8 RGB → float32 ImageNet-normalised values, the scale τ is defined on."""
  xp = _xp(frames)
  if frames.dtype != xp.uint8:
    raise TypeError(f"normalize expects uint8 frames, got {frames.dtype}")
  mean = xp.asarray(IMAGENET_MEAN, xp.float32)
  std = xp.asarray(IMAGENET_STD, xp.float32)
  return (frames.astype(xp.float32) / 255.0 - mean) / std


def token_grid(shape: Sequence[int], tubelet_size: int, patch_size: int) -> tuple[int, int, int]:
  """(T', h, w) for frames of shape (..., T, H, W, C); sizes must divide exactly."""
  if len(shape) < 4 or shape[-1] != 3:
    raise ValueError(f"frames must have shape (..., T, H, W, 3), got {tuple(shape)}")
  t, h, w = shape[-4:-1]
  if t % tubelet_size or h % patch_size or w % patch_size:
    raise ValueError(
        f"frames of shape {tuple(shape)}: T={t} must be a multiple of tubelet_size="
        f"{tubelet_size} and H={h}, W={w} multiples of patch_size={patch_size}")
  return t // tubelet_size, h // patch_size, w // patch_size


def change_scores(frames: Array, *, tubelet_size: int = 2, patch_size: int = 16) -> Array:
  """Per-token change score (B, T', h, w), float32; +inf for the always-kept first tubelet.

  Score of tubelet j ≥ 1 = mean |X[(j+1)·ts − 1] − X[(j−1)·ts]| over the patch's pixels and
  channels, on normalised frames (B, T, H, W, 3).
  """
  xp = _xp(frames)
  tt, h, w = token_grid(frames.shape, tubelet_size, patch_size)
  x = frames.astype(xp.float32)
  last = x[:, 2 * tubelet_size - 1::tubelet_size]  # frames (j+1)·ts − 1, j = 1 … T'−1
  first = x[:, 0:(tt - 1) * tubelet_size:tubelet_size]  # frames (j−1)·ts
  diff = xp.abs(last - first).reshape(x.shape[0], tt - 1, h, patch_size, w, patch_size, 3)
  scores = diff.mean(axis=(3, 5, 6))
  head = xp.full((x.shape[0], 1, h, w), xp.inf, xp.float32)
  return xp.concatenate([head, scores.astype(xp.float32)], axis=1)


def keep_mask(frames: Array, *, threshold: float = 0.1, tubelet_size: int = 2,
              patch_size: int = 16) -> Array:
  """RLT keep mask, bool (B, T', h, w): score > τ (strict), first tubelet always kept."""
  return change_scores(frames, tubelet_size=tubelet_size, patch_size=patch_size) > threshold


def run_lengths(mask: Array) -> Array:
  """Run length (in tubelets) of each kept token, int32 like `mask` (..., T', h, w).

  At a kept token (t, y, x): the next kept t' > t at (y, x), or T', minus t. Dropped tokens get
  0. Computed in token order (the release's (y, x, t)-order bug is not reproduced).
  """
  xp = _xp(mask)
  tt = mask.shape[-3]
  t = xp.arange(tt, dtype=xp.int32).reshape(tt, 1, 1)
  index = xp.where(mask, t, tt).astype(xp.int32)
  after = xp.concatenate([index[..., 1:, :, :], xp.full_like(index[..., :1, :, :], tt)], axis=-3)
  if xp is np:
    next_kept = np.flip(np.minimum.accumulate(np.flip(after, -3), axis=-3), -3)
  else:
    next_kept = jax.lax.cummin(after, axis=after.ndim - 3, reverse=True)
  return xp.where(mask, next_kept - t, 0).astype(xp.int32)


def random_keep_count(num_tokens: int, keep_fraction: float) -> int:
  """round(N·p), halves rounded up (the release keeps int(N·p) − 1)."""
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
  return max(1, math.floor(num_tokens * keep_fraction + 0.5))


def random_mask(rng: jax.Array, batch: int, grid: tuple[int, int, int],
                keep_fraction: float) -> jax.Array:
  """A uniformly random subset of exactly round(N·p) tokens per clip, bool (B, T', h, w)."""
  n = math.prod(grid)
  k = random_keep_count(n, keep_fraction)
  _, chosen = jax.lax.top_k(jax.random.uniform(rng, (batch, n)), k)
  mask = jnp.zeros((batch, n), bool).at[jnp.arange(batch)[:, None], chosen].set(True)
  return mask.reshape(batch, *grid)


# ------------------------------------------------------------------------------------------
# Static-capacity batching.


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """How tokens are chosen and laid out; hashable, so it can be a flax module attribute.

  policy: 'none' (all N tokens), 'rlt' (score > threshold), 'random' (round(N·keep_fraction)
    uniformly random tokens per clip).
  capacity: tokens per clip row when not packing (None: N, no overflow possible).
  packing, row_length, num_rows: pack clips greedily, in order, into num_rows rows of
    row_length tokens (None: N) with segment ids.
  overflow: what happens to a clip whose kept tokens do not fit. 'error': its last tokens
    are cut, it is counted, and `raise_on_overflow` raises outside jit; 'drop_least_changed':
    keep the `capacity` most-changed tokens (padding only); 'full': any overflowing batch runs
    padded at capacity N instead (both shapes are compiled, one runs). Overflowing clips are
    always counted in the model's output.
  """
  policy: str = "none"
  threshold: float = 0.1
  keep_fraction: float = 0.5
  capacity: int | None = None
  packing: bool = False
  row_length: int | None = None
  num_rows: int | None = None
  overflow: str = "error"

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"tokenizer.policy={self.policy!r}: expected one of {POLICIES}")
    if self.overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"tokenizer.overflow={self.overflow!r}: expected one of {OVERFLOW_POLICIES}")
    if self.policy == "random":
      random_keep_count(1, self.keep_fraction)
    for name in ("capacity", "row_length", "num_rows"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"tokenizer.{name}={value!r}: expected a positive int or None")
    if self.packing:
      if self.num_rows is None:
        raise ValueError("tokenizer.packing=True needs tokenizer.num_rows (rows per batch)")
      if self.capacity is not None:
        raise ValueError("tokenizer.capacity is for padded batches; with packing set row_length")
      if self.overflow == "drop_least_changed":
        raise ValueError("tokenizer.overflow='drop_least_changed' needs padded batches "
                         "(packing=False); with packing use 'error' or 'full'")
    elif self.row_length is not None or self.num_rows is not None:
      raise ValueError("tokenizer.row_length/num_rows are for packing=True; "
                       "for padded batches set capacity")


@flax.struct.dataclass
class TokenBatch:
  """Tokens of B clips in R rows of L slots.

  patches (R, L, ts·p·p·3) normalised pixels of each token (zeros in padding);
  positions (R, L) the token's flat (t, y, x) index in its clip; lengths (R, L) its run length;
  segment_ids (R, L) clip index + 1, 0 for padding; kept (B,) tokens the policy kept per clip;
  placed (B,) tokens that found a slot (less than kept only for overflowing clips).
  packed: several clips may share a row (else row b holds clip b, valid slots first).
  """
  patches: jax.Array
  positions: jax.Array
  lengths: jax.Array
  segment_ids: jax.Array
  kept: jax.Array
  placed: jax.Array
  packed: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_overflow(self) -> jax.Array:
    """How many clips lost tokens for lack of room."""
    return jnp.sum(self.placed < self.kept).astype(jnp.int32)


@flax.struct.dataclass
class Selection:
  """All N tokens of each clip, before compaction: patches (B, N, P), which to keep (B, N),
  run lengths (B, N) and change scores (B, N)."""
  patches: jax.Array
  mask: jax.Array
  lengths: jax.Array
  scores: jax.Array


def patchify(frames: Array, tubelet_size: int, patch_size: int) -> Array:
  """(B, T, H, W, C) → (B, N, ts·p·p·C) in (t, y, x) token order, Conv3d kernel order inside."""
  return einops.rearrange(frames, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)",
                          pt=tubelet_size, ph=patch_size, pw=patch_size)


def select_tokens(frames: jax.Array, config: TokenizerConfig, *, tubelet_size: int,
                  patch_size: int, rng: jax.Array | None = None) -> Selection:
  """Applies the policy to normalised frames (B, T, H, W, 3); `rng` only for 'random'."""
  grid = token_grid(frames.shape, tubelet_size, patch_size)
  batch = frames.shape[0]
  scores = change_scores(frames, tubelet_size=tubelet_size, patch_size=patch_size)
  if config.policy == "rlt":
    mask = scores > config.threshold
  elif config.policy == "random":
    if rng is None:
      raise ValueError("tokenizer.policy='random' needs an rng (the model's 'tokens' stream)")
    mask = random_mask(rng, batch, grid, config.keep_fraction)
  else:
    mask = jnp.ones(scores.shape, bool)
  return Selection(
      patches=patchify(frames, tubelet_size, patch_size),
      mask=mask.reshape(batch, -1),
      lengths=run_lengths(mask).reshape(batch, -1),
      scores=scores.reshape(batch, -1))


def _place_step(row_length: int, xp=jnp):
  """Greedy in-order packing step over clips: carry (row, fill) → (row, start) of a clip.

  Shared by the host (`pack_rows_needed`, numpy) and the device (`compact`, lax.scan) so
  both agree on where each clip goes. A clip longer than a row gets a row of its own.
  """
  def step(carry, count):
    row, fill = carry
    count = xp.minimum(count, row_length)
    starts_new = fill + count > row_length
    row = xp.where(starts_new, row + 1, row)
    start = xp.where(starts_new, 0, fill)
    return (row, start + count), (row, start)
  return step


def pack_rows_needed(kept_counts: Sequence[int], row_length: int) -> int:
  """Rows the in-order greedy packing of `compact` needs for these per-clip counts."""
  step = _place_step(row_length, np)
  carry, row = (np.int64(0), np.int64(0)), -1
  for count in np.asarray(kept_counts, np.int64):
    carry, (row, _) = step(carry, count)
  return int(row) + 1


def compact(selection: Selection, config: TokenizerConfig) -> TokenBatch:
  """Gathers each clip's kept tokens, in original order, into static-shape rows."""
  patches, mask = selection.patches, selection.mask
  batch, n, _ = patches.shape
  kept = mask.sum(-1).astype(jnp.int32)
  if config.packing:
    num_rows, row_length = config.num_rows, config.row_length or n
    _, (rows, starts) = jax.lax.scan(
        _place_step(row_length), (jnp.int32(0), jnp.int32(0)), kept)
  else:
    num_rows, row_length = batch, config.capacity or n
    rows, starts = jnp.arange(batch), jnp.zeros(batch, jnp.int32)
    if config.overflow == "drop_least_changed" and row_length < n:
      mask = _keep_most_changed(mask, selection.scores, row_length)

  rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
  fits = mask & (rank < row_length - starts[:, None]) & (rows[:, None] < num_rows)
  size = num_rows * row_length
  dest = jnp.where(fits, rows[:, None] * row_length + starts[:, None] + rank, size)
  source = jnp.full((size,), -1, jnp.int32).at[dest.ravel()].set(
      jnp.arange(batch * n, dtype=jnp.int32), mode="drop")
  valid = source >= 0
  index = jnp.maximum(source, 0)
  gathered = patches.reshape(batch * n, -1)[index]
  return TokenBatch(
      patches=jnp.where(valid[:, None], gathered, 0).reshape(num_rows, row_length, -1),
      positions=jnp.where(valid, index % n, 0).reshape(num_rows, row_length),
      lengths=jnp.where(valid, selection.lengths.reshape(-1)[index], 0).reshape(
          num_rows, row_length),
      segment_ids=jnp.where(valid, index // n + 1, 0).reshape(num_rows, row_length),
      kept=kept,
      placed=fits.sum(-1).astype(jnp.int32),
      packed=config.packing)


def _keep_most_changed(mask: jax.Array, scores: jax.Array, capacity: int) -> jax.Array:
  """Of each clip's kept tokens, keeps the `capacity` with the largest change score."""
  ranked = jnp.where(mask, scores, -jnp.inf)
  cutoff = jax.lax.top_k(ranked, capacity)[0][:, -1:]
  return mask & (ranked >= cutoff)


def raise_on_overflow(num_overflow: Array, config: TokenizerConfig) -> None:
  """Host-side check for overflow='error' (call it on the model output, outside jit)."""
  count = int(np.asarray(num_overflow))
  if count and config.overflow == "error":
    where = (f"packing into {config.num_rows} rows of {config.row_length or 'N'} tokens"
             if config.packing else f"capacity {config.capacity}")
    raise OverflowError(
        f"{count} clip(s) kept more tokens than fit ({where}); raise the capacity, pick it "
        "per batch with choose_capacity, or set tokenizer.overflow to "
        "'drop_least_changed' or 'full'")


# ------------------------------------------------------------------------------------------
# Capacity buckets: a bounded set of static shapes.


def capacity_buckets(num_tokens: int, step: int = 128) -> tuple[int, ...]:
  """Multiples of `step` below N, then N: a run compiles at most one forward per bucket."""
  return tuple(range(step, num_tokens, step)) + (num_tokens,)


def choose_capacity(kept_counts: Sequence[int], buckets: Sequence[int]) -> int:
  """Smallest bucket that holds the largest clip of the batch."""
  need = int(np.max(np.asarray(kept_counts)))
  for bucket in sorted(buckets):
    if bucket >= need:
      return int(bucket)
  raise ValueError(f"a clip keeps {need} tokens, more than the largest bucket {max(buckets)}")
