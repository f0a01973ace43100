"""The VideoMAE-2 fine-tuning ViT (OpenGVLab/VideoMAEv2 `modeling_finetune.py`) over RLT tokens.

Math follows shared/specs/videomae2.md exactly, so converted checkpoints reproduce the
PyTorch logits: tubelet embedding (a Conv3d with kernel = stride, applied as one matmul per
token), a fixed float64-built interleaved sin/cos table, pre-norm blocks with q/v biases and a
zero key bias, exact GELU, LayerNorm eps 1e-6, mean pooling → fc_norm → head.

The model runs on a `rlt.TokenBatch` (rows of tokens with segment ids), so padding and
packing are invisible to it; given frames it tokenises them first with its `tokenizer`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import rlt
from rlt_jax.models.attention import dot_product_attention

# name: (width, depth, heads, MLP hidden, patch size). ViT-g's MLP width is written down.
VARIANTS = {
    "tiny": (64, 2, 2, 256, 16),
    "S/16": (384, 12, 6, 1536, 16),
    "B/16": (768, 12, 12, 3072, 16),
    "L/16": (1024, 24, 16, 4096, 16),
    "H/16": (1280, 32, 16, 5120, 16),
    "g/14": (1408, 40, 16, 6144, 14),
}

LAYER_NORM_EPS = 1e-6
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def variant(name: str) -> dict[str, int]:
  """Architecture fields of a named variant, for `VisionTransformer(**variant(name), ...)`."""
  if name not in VARIANTS:
    raise ValueError(f"model.variant={name!r}: expected one of {sorted(VARIANTS)}")
  width, depth, heads, mlp_dim, patch = VARIANTS[name]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, patch_size=patch)


@functools.lru_cache(maxsize=8)
def sinusoid_table(num_positions: int, width: int) -> np.ndarray:
  """VideoMAE-2's fixed table (N, D): angle n / 10000^(2⌊j/2⌋/D), sin at even j, cos at odd j.

  Built in float64 and cast to float32, as upstream (float32 arithmetic moves logits ~1e-4).
  """
  position = np.arange(num_positions, dtype=np.float64)[:, None]
  exponent = 2 * (np.arange(width) // 2) / width
  angle = position / np.power(10000.0, exponent)[None, :]
  table = np.where(np.arange(width) % 2 == 0, np.sin(angle), np.cos(angle))
  return table.astype(np.float32)


def _torch_default_uniform(fan_in: int):
  """PyTorch's default Conv/Linear bias init, U(±1/sqrt(fan_in)) (VideoMAE-2 keeps it)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


@flax.struct.dataclass
class Output:
  """logits (B, classes) float32; kept (B,) tokens the policy kept; placed (B,) tokens that
  ran; num_overflow: clips that did not fit their row (reported, never hidden)."""
  logits: jax.Array
  kept: jax.Array
  placed: jax.Array
  num_overflow: jax.Array


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x, segment_ids, valid_lengths):
    rows, length, width = x.shape
    qkv = nn.Dense(3 * width, use_bias=False, dtype=self.dtype, kernel_init=trunc_normal,
                   name="qkv")(x)
    q_bias = self.param("q_bias", nn.initializers.zeros, (width,))
    v_bias = self.param("v_bias", nn.initializers.zeros, (width,))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, v = q + q_bias.astype(self.dtype), v + v_bias.astype(self.dtype)  # key bias is zero
    heads = lambda t: t.reshape(rows, length, self.num_heads, width // self.num_heads)
    out = dot_product_attention(heads(q), heads(k), heads(v), segment_ids,
                                valid_lengths=valid_lengths, implementation=self.implementation)
    return nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(
        out.reshape(rows, length, width))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=trunc_normal, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # exact erf GELU; flax's default is the tanh one
    return nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm block; drop path is one Bernoulli per clip (gathered to its tokens by segment)."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, segment_ids, valid_lengths, num_clips: int, deterministic: bool):
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)
    y = Attention(self.num_heads, self.dtype, self.attention, name="attn")(
        norm("norm1")(x), segment_ids, valid_lengths)
    x = x + self._drop_path(nn.Dropout(self.dropout)(y, deterministic), segment_ids,
                            num_clips, deterministic)
    y = Mlp(self.mlp_dim, self.dtype, name="mlp")(norm("norm2")(x))
    return x + self._drop_path(nn.Dropout(self.dropout)(y, deterministic), segment_ids,
                               num_clips, deterministic)

  def _drop_path(self, y, segment_ids, num_clips, deterministic):
    if deterministic or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    clip_keep = jax.random.bernoulli(self.make_rng("dropout"), keep, (num_clips + 1,))
    scale = clip_keep[segment_ids].astype(y.dtype) / jnp.asarray(keep, y.dtype)
    return y * scale[..., None]


class VisionTransformer(nn.Module):
  """VideoMAE-2 ViT. Call it on frames (B, T, H, W, 3), uint8 or ImageNet-normalised, or on
  a ready `rlt.TokenBatch`; returns an `Output` with per-clip logits.

  rngs: 'tokens' for tokenizer.policy='random'; 'dropout' for dropout/drop path when training.
  """
  num_classes: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 16
  tubelet_size: int = 2
  num_frames: int = 16
  image_size: int = 224
  length_embedding: bool = False
  dropout: float = 0.0
  drop_path: float = 0.0
  head_dropout: float = 0.0
  head_init_scale: float = 0.001
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: bool = False
  tokenizer: rlt.TokenizerConfig = rlt.TokenizerConfig()

  @property
  def grid(self) -> tuple[int, int, int]:
    side = self.image_size // self.patch_size
    return self.num_frames // self.tubelet_size, side, side

  @property
  def num_tokens(self) -> int:
    return int(np.prod(self.grid))

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"model width {self.width} is not divisible by {self.num_heads} heads")
    fan_in = self.tubelet_size * self.patch_size ** 2 * 3
    self.patch_embed = nn.DenseGeneral(
        self.width, axis=(-4, -3, -2, -1), dtype=self.dtype,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=_torch_default_uniform(fan_in), name="patch_embed")
    if self.length_embedding:
      self.length_table = self.param("length_embedding", trunc_normal,
                                     (self.grid[0], self.width))
    block = nn.remat(Block, static_argnums=(4, 5)) if self.remat else Block
    rates = np.linspace(0.0, self.drop_path, self.depth)
    self.blocks = [block(self.num_heads, self.mlp_dim, float(rate), self.dropout, self.dtype,
                         self.attention, name=f"blocks_{i}") for i, rate in enumerate(rates)]
    self.fc_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="fc_norm")
    self.head_drop = nn.Dropout(self.head_dropout)
    scaled = lambda init: lambda *a: init(*a) * self.head_init_scale
    self.head = nn.Dense(self.num_classes, kernel_init=scaled(trunc_normal), name="head")

  def __call__(self, video: jax.Array | rlt.TokenBatch, *, train: bool = False) -> Output:
    if isinstance(video, rlt.TokenBatch):
      return self.classify(video, train)
    config = self.tokenizer
    selection = self.select(video)
    batch = rlt.compact(selection, config)
    if config.overflow != "full" or self.is_initializing():
      return self.classify(batch, train)
    full = rlt.compact(selection, rlt.TokenizerConfig(overflow="full"))  # capacity N, padded
    out = nn.cond(batch.num_overflow > 0,
                  lambda model, full, batch: model.classify(full, train),
                  lambda model, full, batch: model.classify(batch, train), self, full, batch)
    return out.replace(num_overflow=batch.num_overflow)

  def select(self, video: jax.Array) -> rlt.Selection:
    """Normalises uint8 frames and applies the tokenizer's policy (draws 'tokens' if random)."""
    frames = rlt.normalize(video) if video.dtype == jnp.uint8 else video
    if tuple(frames.shape[1:]) != (self.num_frames, self.image_size, self.image_size, 3):
      raise ValueError(f"frames of shape {tuple(frames.shape)}: this model takes (B, "
                       f"{self.num_frames}, {self.image_size}, {self.image_size}, 3)")
    rng = self.make_rng("tokens") if self.tokenizer.policy == "random" else None
    return rlt.select_tokens(frames, self.tokenizer, tubelet_size=self.tubelet_size,
                             patch_size=self.patch_size, rng=rng)

  def classify(self, batch: rlt.TokenBatch, train: bool = False) -> Output:
    """Logits of each clip from its tokens alone: padding is neither attended nor pooled."""
    patches = batch.patches.reshape(
        *batch.patches.shape[:2], self.tubelet_size, self.patch_size, self.patch_size, 3)
    x = self.patch_embed(patches)
    x = x + jnp.asarray(sinusoid_table(self.num_tokens, self.width))[batch.positions]
    if self.length_embedding:
      lengths = batch.lengths
      x = x + jnp.where(lengths[..., None] > 0, self.length_table[jnp.maximum(lengths - 1, 0)],
                        0.0)
    x = x.astype(self.dtype)
    num_clips = batch.kept.shape[0]
    valid = batch.segment_ids > 0
    valid_lengths = None if batch.packed else valid.sum(-1).astype(jnp.int32)
    for block in self.blocks:
      x = block(x, batch.segment_ids, valid_lengths, num_clips, not train)

    x = x.astype(jnp.float32)
    if batch.packed:  # sum each clip's tokens across rows with a one-hot matmul
      owner = batch.segment_ids[..., None] == jnp.arange(1, num_clips + 1)
      sums = jnp.einsum("rlb,rld->bd", owner.astype(x.dtype), x,
                        precision=jax.lax.Precision.HIGHEST)
    else:
      sums = jnp.sum(jnp.where(valid[..., None], x, 0.0), axis=1)
    pooled = sums / jnp.maximum(batch.placed, 1)[:, None].astype(x.dtype)
    pooled = self.head_drop(self.fc_norm(pooled), not train)
    return Output(logits=self.head(pooled), kept=batch.kept, placed=batch.placed,
                  num_overflow=batch.num_overflow)


def build(variant_name: str, *, num_classes: int, **overrides) -> VisionTransformer:
  """A named variant with any field overridden (dtype may be given by name)."""
  fields = variant(variant_name) | overrides
  if isinstance(fields.get("dtype"), str):
    if fields["dtype"] not in DTYPES:
      raise ValueError(f"model.dtype={fields['dtype']!r}: expected one of {sorted(DTYPES)}")
    fields["dtype"] = DTYPES[fields["dtype"]]
  return VisionTransformer(num_classes=num_classes, **fields)
