"""On-device augmentation of normalised clips, as the release does it (timm semantics).

Mixup / CutMix per batch (each clip mixed with the batch reversed; one λ per batch; CutMix's
box covers every frame, and λ is corrected to the box's true area), label smoothing, and random
erasing ('pixel' mode: one box per clip, filled with N(0, 1) noise that is the same on every
frame, so an erased area is static and RLT keeps it once). RLT's mask is computed afterwards,
on what the model sees, as in the release; or, with `carry_mask`, before them and carried
through them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Augment:
  num_classes: int
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1
  erase_prob: float = 0.25
  erase_min_area: float = 0.02
  erase_max_area: float = 1 / 3
  erase_min_aspect: float = 0.3

  @property
  def mixes(self) -> bool:
    """Whether `mix` can change a clip (Mixup or CutMix on, with a chance to apply)."""
    return bool((self.mixup_alpha or self.cutmix_alpha) and self.mix_prob)

  @property
  def changes_clips(self) -> bool:
    """Whether `mix` or `erase` can change a clip (else masks before and after agree)."""
    return self.mixes or bool(self.erase_prob)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _box(rng: jax.Array, height: int, width: int, cut: jax.Array
         ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """A box of side ratio `cut` at a uniform centre, clipped to the image (timm's rand_bbox)."""
  cy_key, cx_key = jax.random.split(rng)
  h, w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  cy = jax.random.randint(cy_key, (), 0, height)
  cx = jax.random.randint(cx_key, (), 0, width)
  return (jnp.clip(cy - h // 2, 0, height), jnp.clip(cy + h // 2, 0, height),
          jnp.clip(cx - w // 2, 0, width), jnp.clip(cx + w // 2, 0, width))


def _inside(y0, y1, x0, x1, height: int, width: int) -> jax.Array:
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


class Mixing(NamedTuple):
  """What `mix` did, for keep masks computed before it (`carry_mask`): whether it mixed, with
  CutMix or Mixup, and CutMix's box (H, W) of pixels taken from the reversed batch."""
  applied: jax.Array
  cutmix: jax.Array
  box: jax.Array


def mix(rng: jax.Array, frames: jax.Array, labels: jax.Array, config: Augment
        ) -> tuple[jax.Array, jax.Array, Mixing]:
  """(frames, soft targets, what was done): Mixup or CutMix with the reversed batch, then
  label smoothing."""
  targets = smooth_one_hot(labels, config.num_classes, config.label_smoothing)
  height, width = frames.shape[2:4]
  if not config.mixes:
    return frames, targets, Mixing(jnp.bool_(False), jnp.bool_(False),
                                   jnp.zeros((height, width), bool))
  apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(rng, 5)
  apply = jax.random.uniform(apply_key) < config.mix_prob
  use_cutmix = (jax.random.uniform(switch_key) < config.switch_prob if config.mixup_alpha
                else jnp.bool_(True)) if config.cutmix_alpha else jnp.bool_(False)
  lam_cutmix = jax.random.beta(cutmix_key, config.cutmix_alpha or 1.0, config.cutmix_alpha or 1.0)
  y0, y1, x0, x1 = _box(box_key, height, width, jnp.sqrt(1.0 - lam_cutmix))
  inside = _inside(y0, y1, x0, x1, height, width)
  lam_cutmix = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
  lam_mixup = jax.random.beta(mixup_key, config.mixup_alpha or 1.0, config.mixup_alpha or 1.0)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
  other = frames[::-1]
  mixed = jnp.where(use_cutmix, jnp.where(inside[None, None, :, :, None], other, frames),
                    lam * frames + (1.0 - lam) * other)
  frames = jnp.where(apply, mixed, frames)
  return frames, lam * targets + (1.0 - lam) * targets[::-1], Mixing(apply, use_cutmix, inside)


def erase(rng: jax.Array, frames: jax.Array, config: Augment) -> tuple[jax.Array, jax.Array]:
  """Random erasing: with probability erase_prob, one box per clip of N(0, 1) noise, the same
  on every frame. Returns the frames and each clip's erased pixels (B, H, W)."""
  _, _, height, width, channels = frames.shape
  if not config.erase_prob:
    return frames, jnp.zeros((frames.shape[0], height, width), bool)

  def one(key, clip):
    p_key, area_key, aspect_key, y_key, x_key, noise_key = jax.random.split(key, 6)
    area = height * width * jax.random.uniform(area_key, (), minval=config.erase_min_area,
                                               maxval=config.erase_max_area)
    log_aspect = jax.random.uniform(aspect_key, (), minval=math.log(config.erase_min_aspect),
                                    maxval=-math.log(config.erase_min_aspect))
    aspect = jnp.exp(log_aspect)
    h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, height).astype(jnp.int32)
    w = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, width).astype(jnp.int32)
    top = jax.random.randint(y_key, (), 0, height - h + 1)
    left = jax.random.randint(x_key, (), 0, width - w + 1)
    inside = _inside(top, top + h, left, left + w, height, width)
    inside &= jax.random.uniform(p_key) < config.erase_prob
    noise = jax.random.normal(noise_key, (height, width, channels), clip.dtype)
    return jnp.where(inside[None, :, :, None], noise[None], clip), inside

  return jax.vmap(one)(jax.random.split(rng, frames.shape[0]), frames)


def _coverage(pixels: jax.Array, patch_size: int) -> tuple[jax.Array, jax.Array]:
  """Patches (..., h, w) wholly and partly covered by a pixel mask (..., H, W)."""
  *lead, height, width = pixels.shape
  cells = pixels.reshape(*lead, height // patch_size, patch_size, width // patch_size,
                         patch_size)
  return cells.all(axis=(-3, -1)), cells.any(axis=(-3, -1))


def carry_mask(mask: jax.Array, mixing: Mixing, erased: jax.Array, *,
               patch_size: int) -> jax.Array:
  """The keep mask (B, T', h, w) of the mixed and erased clips, from each source clip's own
  mask (B, T', h, w) before `mix` and `erase` (config rlt.mask_before_mix; docs/rlt.md):

  - Mixup: a token is kept if either of its two source clips keeps it;
  - CutMix: a patch wholly inside the box takes the other clip's decision, one wholly outside
    keeps its own, one on the box's edge is kept if either keeps it;
  - random erasing: a patch wholly inside the erased box holds the same noise on every frame,
    so only its first tubelet is kept (as the rule gives on the erased clip); a patch partly
    inside keeps the decision above.
  """
  other = mask[::-1]
  either = mask | other
  inside, touched = _coverage(mixing.box, patch_size)
  cut = jnp.where(inside, other, jnp.where(touched, either, mask))
  mask = jnp.where(mixing.applied, jnp.where(mixing.cutmix, cut, either), mask)
  blanked, _ = _coverage(erased, patch_size)  # (B, h, w)
  first = jnp.arange(mask.shape[1]) == 0
  return jnp.where(blanked[:, None], first[None, :, None, None], mask)


def augment_and_mask(mix_key: jax.Array, erase_key: jax.Array, frames: jax.Array,
                     labels: jax.Array, config: Augment, select: Callable[[jax.Array], jax.Array],
                     grid: tuple[int, int, int], *, patch_size: int, carry: bool = True
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(augmented frames, soft targets, mask after, mask before): `mix` then `erase`, and the
  keep masks (B, N) of the result both ways: `select` of the augmented frames (the release),
  and `select` of each source carried through them (`carry_mask` on the token `grid`
  (T', h, w)). With `carry` False (a mask that does not look at pixels) both are the first."""
  sources = select(frames) if carry else None
  frames, targets, mixing = mix(mix_key, frames, labels, config)
  frames, erased = erase(erase_key, frames, config)
  after = select(frames)
  if not carry:
    return frames, targets, after, after
  before = carry_mask(sources.reshape(-1, *grid), mixing, erased, patch_size=patch_size)
  return frames, targets, after, before.reshape(after.shape)
