"""Run-Length Tokenization: *which* tokens of a clip to keep (the policy).

The rule is the official release's, token for token (docs/rlt.md): tubelet j at patch (y, x)
is kept when the mean absolute difference between frame (j+1)·ts−1 and frame (j−1)·ts over
that patch exceeds τ (strictly); the first tubelet is always kept. Policies: 'none' (every
token), 'rlt' (that rule; or, with reference='run_start', the same test against the start of
the token's run, which slow drift cannot slip past), 'random' (round(N·p) uniformly random
tokens per clip, the paper's baseline). *How* the kept tokens are laid out in static shapes
is `layout.py`'s job.

`normalize`, `keep_mask`, `change_scores` and `run_lengths` accept numpy arrays (host side, e.g.
the input pipeline's sorting counts) as well as jax arrays (inside jit); `select` runs in jit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POLICIES = ("none", "rlt", "random")

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


REFERENCES = ("previous", "run_start")


def _check_reference(reference: str) -> None:
  if reference not in REFERENCES:
    raise ValueError(f"rlt.reference={reference!r}: expected one of {REFERENCES}")


def _patches(frames: Array, t: int, patch_size: int) -> Array:
  """Frame t of every clip as patches (B, h, w, p·p·3), float32."""
  xp = _xp(frames)
  b, _, hh, ww, c = frames.shape
  x = frames[:, t].astype(xp.float32).reshape(b, hh // patch_size, patch_size,
                                                ww // patch_size, patch_size, c)
  return xp.moveaxis(x, 2, 3).reshape(b, hh // patch_size, ww // patch_size, -1)


def change_scores(frames: Array, *, tubelet_size: int = 2, patch_size: int = 16,
                  reference: str = "previous", threshold: float | None = None) -> Array:
  """Per-token change score (B, T', h, w), float32; +inf for the always-kept first tubelet.

  'previous' (the release): score of tubelet j ≥ 1 = mean |X[(j+1)·ts − 1] − X[(j−1)·ts]| over
  the patch's pixels and channels, on normalised frames (B, T, H, W, 3). 'run_start': the same
  difference, but against frame s·ts of the tubelet s that started the current run (the frame
  the run's one token carries); s moves to j whenever tubelet j's score exceeds `threshold`
  (needed, since the reference depends on it). With s = j − 1 the two agree.
  """
  xp = _xp(frames)
  _check_reference(reference)
  tt, h, w = token_grid(frames.shape, tubelet_size, patch_size)
  head = xp.full((frames.shape[0], 1, h, w), xp.inf, xp.float32)
  if reference == "previous":
    x = frames.astype(xp.float32)
    last = x[:, 2 * tubelet_size - 1::tubelet_size]  # frames (j+1)·ts − 1, j = 1 … T'−1
    first = x[:, 0:(tt - 1) * tubelet_size:tubelet_size]  # frames (j−1)·ts
    diff = xp.abs(last - first).reshape(x.shape[0], tt - 1, h, patch_size, w, patch_size, 3)
    scores = diff.mean(axis=(3, 5, 6))
    return xp.concatenate([head, scores.astype(xp.float32)], axis=1)
  if threshold is None:
    raise ValueError("reference='run_start' needs the threshold: a run restarts where the "
                     "change from its start exceeds it")
  start = _patches(frames, 0, patch_size)  # the frame each patch's current run started at
  scores = [head[:, 0]]
  for j in range(1, tt):  # T' is small and static: a loop that jit unrolls
    score = xp.abs(_patches(frames, (j + 1) * tubelet_size - 1, patch_size) - start).mean(-1)
    restart = score > threshold
    start = xp.where(restart[..., None], _patches(frames, j * tubelet_size, patch_size), start)
    scores.append(score.astype(xp.float32))
  return xp.stack(scores, axis=1)


def keep_mask(frames: Array, *, threshold: float = 0.1, tubelet_size: int = 2,
              patch_size: int = 16, reference: str = "previous") -> Array:
  """RLT keep mask, bool (B, T', h, w): score > τ (strict), first tubelet always kept."""
  return change_scores(frames, tubelet_size=tubelet_size, patch_size=patch_size,
                       reference=reference, threshold=threshold) > threshold


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
# The policy.


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which tokens a clip keeps. The single source of τ for the model, pipeline and tools.

  kind: 'none' | 'rlt' | 'random'. threshold: τ for 'rlt', on ImageNet-normalised pixels.
  keep_fraction: p for 'random'. max_tokens: an explicit, lossy cap: a clip that keeps more
    keeps its `max_tokens` most-changed tokens (None: never drop a kept token).
  reference: what a tubelet is compared with: 'previous' (the release: the previous tubelet)
    or 'run_start' (the start of its run, so that slow drift cannot hide; docs/rlt.md).
  """
  kind: str = "none"
  threshold: float = 0.1
  keep_fraction: float = 0.5
  max_tokens: int | None = None
  reference: str = "previous"

  def __post_init__(self):
    if self.kind not in POLICIES:
      raise ValueError(f"rlt.policy={self.kind!r}: expected one of {POLICIES}")
    _check_reference(self.reference)
    if not (math.isfinite(self.threshold) and self.threshold >= 0):
      raise ValueError(f"rlt.threshold={self.threshold!r}: expected a finite number ≥ 0")
    if self.kind == "random":
      random_keep_count(1, self.keep_fraction)
    if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                        or self.max_tokens < 1):
      raise ValueError(f"rlt.max_tokens={self.max_tokens!r}: expected a positive int or None")


def select(frames: jax.Array, policy: Policy, *, tubelet_size: int, patch_size: int,
           rng: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
  """The keep mask (B, N) of normalised frames (B, T, H, W, 3) in (t, y, x) token order.

  `rng` is needed by 'random' only. Clips with `valid` False keep no token (batch padding
  costs nothing downstream).
  """
  grid = token_grid(frames.shape, tubelet_size, patch_size)
  batch = frames.shape[0]
  if policy.kind == "random":
    if rng is None:
      raise ValueError("rlt.policy='random' needs an rng")
    mask = random_mask(rng, batch, grid, policy.keep_fraction).reshape(batch, -1)
  elif policy.kind == "rlt" or policy.max_tokens is not None:
    scores = change_scores(frames, tubelet_size=tubelet_size, patch_size=patch_size,
                           reference=policy.reference, threshold=policy.threshold)
    scores = scores.reshape(batch, -1)
    mask = scores > policy.threshold if policy.kind == "rlt" else jnp.ones(scores.shape, bool)
    if policy.max_tokens is not None and policy.max_tokens < mask.shape[1]:
      mask = _keep_most_changed(mask, scores, policy.max_tokens)
  else:
    mask = jnp.ones((batch, math.prod(grid)), bool)
  if valid is not None:
    mask = mask & valid[:, None]
  return mask


def _keep_most_changed(mask: jax.Array, scores: jax.Array, cap: int) -> jax.Array:
  """Of each clip's kept tokens, the `cap` with the largest change score (ties: earliest)."""
  ranked = jnp.where(mask, scores, -jnp.inf)
  _, chosen = jax.lax.top_k(ranked, cap)
  top = jnp.zeros(mask.shape, bool).at[jnp.arange(mask.shape[0])[:, None], chosen].set(True)
  return mask & top


def kept_counts(frames: np.ndarray, policy: Policy, *, tubelet_size: int,
                patch_size: int) -> np.ndarray:
  """Tokens each uint8 clip (B, T, H, W, 3) keeps under `policy`, on the host, int32 (B,).

  For ordering clips by cost before batching; the device recomputes the exact mask itself.
  """
  num = math.prod(token_grid(frames.shape, tubelet_size, patch_size))
  if policy.kind == "rlt":
    mask = keep_mask(normalize(frames), threshold=policy.threshold, tubelet_size=tubelet_size,
                     patch_size=patch_size, reference=policy.reference)
    counts = mask.reshape(len(frames), -1).sum(-1)
  elif policy.kind == "random":
    counts = np.full(len(frames), random_keep_count(num, policy.keep_fraction))
  else:
    counts = np.full(len(frames), num)
  if policy.max_tokens is not None:
    counts = np.minimum(counts, policy.max_tokens)
  return counts.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class KeptCount:
  """Tokens one uint8 clip (T, H, W, 3) keeps under `policy`, on the host: the cost by which
  the input pipeline orders clips before batching (a picklable callable with a stable repr)."""
  policy: Policy
  tubelet_size: int
  patch_size: int

  def __call__(self, clip: np.ndarray) -> int:
    return int(kept_counts(np.asarray(clip)[None], self.policy, tubelet_size=self.tubelet_size,
                           patch_size=self.patch_size)[0])
