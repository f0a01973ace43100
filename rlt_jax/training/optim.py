"""AdamW with per-layer learning-rate decay, the weight-decay mask, and warmup + cosine.

The RLT release computes layer-decay factors but its optimizer never applies them; here they
are applied: layer 0 (patch embedding, tables) gets decay^(depth+1), block i gets
decay^(depth−i), the head and fc_norm get 1. Blocks stacked by `model.scan` (under 'blocks',
block i at index i of the leading axis) get the same factors slice by slice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

NO_DECAY_NAMES = ("length_embedding",)


def layer_id(path: tuple[str, ...], depth: int) -> int:
  """0 for the embedding, i + 1 for blocks_i, depth + 1 for fc_norm and the head."""
  top = path[0]
  if top.startswith("blocks_"):
    return int(top.split("_")[1]) + 1
  if top in ("patch_embed", "length_embedding"):
    return 0
  return depth + 1


def _paths(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, _: tuple(getattr(k, "key", str(k)) for k in p), params)


def _stacked(path: tuple[str, ...]) -> bool:
  """A parameter of the blocks stacked by `model.scan` (leading axis: the block)."""
  return path[0] == "blocks"


def layer_scales(params: Any, depth: int, decay: float) -> Any:
  """The learning-rate multiplier of every parameter (an array over blocks if stacked)."""
  def scale(path, x):
    if _stacked(path):
      block = np.arange(depth, dtype=np.float64).reshape((depth,) + (1,) * (x.ndim - 1))
      return decay ** (depth - block)
    return decay ** (depth + 1 - layer_id(path, depth))
  return jax.tree_util.tree_map(scale, _paths(params), params,
                                is_leaf=lambda x: isinstance(x, tuple))


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on biases, norms (1-D per block) or learned tables."""
  return jax.tree_util.tree_map(
      lambda p, x: x.ndim - _stacked(p) > 1 and p[-1] not in NO_DECAY_NAMES,
      _paths(params), params, is_leaf=lambda x: isinstance(x, tuple))


def schedule(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int
             ) -> optax.Schedule:
  """Linear warmup to lr × batch/256, then cosine to min_lr × batch/256."""
  scale = config.batch_size / 256
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.lr * scale, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=config.optim.min_lr * scale)


def scale_by_tree(factors: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, f: u * jnp.asarray(f, u.dtype), updates,
                                  factors), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(config: ml_collections.ConfigDict, params: Any, *, depth: int, total_steps: int,
         warmup_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) for the config's `optim` block."""
  lr = schedule(config, total_steps, warmup_steps)
  o = config.optim
  steps = [optax.clip_by_global_norm(o.clip_grad_norm)] if o.clip_grad_norm else []
  steps += [
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
      optax.add_decayed_weights(o.weight_decay, mask=decay_mask(params)),
      scale_by_tree(layer_scales(params, depth, o.layer_decay)),
      optax.scale_by_learning_rate(lr),
  ]
  return optax.chain(*steps), lr
