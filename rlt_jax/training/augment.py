"""On-device augmentation of normalised clips, as the release does it (timm semantics).

Mixup / CutMix per batch (each clip mixed with the batch reversed; one λ per batch; CutMix's
box covers every frame, and λ is corrected to the box's true area), label smoothing, and random
erasing ('pixel' mode: one box per clip, filled with N(0, 1) noise that is the same on every
frame, so an erased area is static and RLT keeps it once). RLT's mask is computed afterwards,
on what the model sees.
"""

from __future__ import annotations

import dataclasses
import math

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


def mix(rng: jax.Array, frames: jax.Array, labels: jax.Array, config: Augment
        ) -> tuple[jax.Array, jax.Array]:
  """(frames, soft targets): Mixup or CutMix with the reversed batch, then label smoothing."""
  targets = smooth_one_hot(labels, config.num_classes, config.label_smoothing)
  if not (config.mixup_alpha or config.cutmix_alpha) or not config.mix_prob:
    return frames, targets
  apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(rng, 5)
  apply = jax.random.uniform(apply_key) < config.mix_prob
  use_cutmix = (jax.random.uniform(switch_key) < config.switch_prob if config.mixup_alpha
                else jnp.bool_(True)) if config.cutmix_alpha else jnp.bool_(False)
  height, width = frames.shape[2:4]
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
  return frames, lam * targets + (1.0 - lam) * targets[::-1]


def erase(rng: jax.Array, frames: jax.Array, config: Augment) -> jax.Array:
  """Random erasing: with probability erase_prob, one box per clip of N(0, 1) noise."""
  if not config.erase_prob:
    return frames
  _, _, height, width, channels = frames.shape

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
    return jnp.where(inside[None, :, :, None], noise[None], clip)

  return jax.vmap(one)(jax.random.split(rng, frames.shape[0]), frames)
