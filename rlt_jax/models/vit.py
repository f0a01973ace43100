"""The VideoMAE-2 fine-tuning ViT (OpenGVLab/VideoMAEv2 `modeling_finetune.py`) over RLT tokens.

Math follows docs/videomae2.md exactly, so converted checkpoints reproduce the PyTorch logits:
tubelet embedding (a Conv3d with kernel = stride, applied as one matmul per token), a fixed
float64-built interleaved sin/cos table, pre-norm blocks with q/v biases and a zero key bias,
exact GELU, LayerNorm eps 1e-6, mean pooling → fc_norm → head.

The model consumes a `layout.TokenBatch`: token-wise layers run on its slots, attention on one
row per clip (`layout.to_rows` / `from_rows`), so padding and the layout are invisible to the
math. `ModelSpec` is the one record of an architecture: built from a variant name, saved as
model.json, read back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import layout
from rlt_jax.models import tome
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


REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each block in the backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model's architecture: what model.json holds and every builder reads."""
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

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.type == "bool" or f.name == "length_embedding":
        if not isinstance(value, bool):
          raise ValueError(f"model.{f.name}={value!r}: expected true or false")
      elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{f.name}={value!r}: expected a positive integer")
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} is not divisible by num_heads="
                       f"{self.num_heads}")
    if self.num_frames % self.tubelet_size or self.image_size % self.patch_size:
      raise ValueError(f"model: num_frames={self.num_frames} must be a multiple of "
                       f"tubelet_size={self.tubelet_size} and image_size={self.image_size} of "
                       f"patch_size={self.patch_size}")

  @classmethod
  def from_variant(cls, name: str, **overrides) -> "ModelSpec":
    """A named variant (`VARIANTS`) with any field overridden."""
    if name not in VARIANTS:
      raise ValueError(f"model.variant={name!r}: expected one of {sorted(VARIANTS)}")
    width, depth, heads, mlp_dim, patch = VARIANTS[name]
    return cls(**(dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                       patch_size=patch) | overrides))

  @classmethod
  def from_dict(cls, fields: dict[str, Any], source: str = "model.json") -> "ModelSpec":
    """From a saved dict; unknown or missing keys are an error naming `source`."""
    if not isinstance(fields, dict):
      raise ValueError(f"{source}: expected a JSON object, got {type(fields).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
      raise ValueError(f"{source}: unknown model fields {unknown}; expected {sorted(names)}")
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def grid(self) -> tuple[int, int, int]:
    side = self.image_size // self.patch_size
    return self.num_frames // self.tubelet_size, side, side

  @property
  def num_tokens(self) -> int:
    return int(np.prod(self.grid))


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


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, tokens: layout.TokenBatch | None = None, bias=None):
    """x on the layout's slots (G, L, D) with `tokens`, or on clip rows (R, C, D) with a key
    `bias` (R, C) (ToMe); returns (output like x, keys (…, heads, head_dim))."""
    width = x.shape[-1]
    qkv = nn.Dense(3 * width, use_bias=False, dtype=self.dtype, kernel_init=trunc_normal,
                   name="qkv")(x)
    q_bias = self.param("q_bias", nn.initializers.zeros, (width,))
    v_bias = self.param("v_bias", nn.initializers.zeros, (width,))
    biases = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])  # key bias is zero
    qkv = (qkv + biases.astype(self.dtype)).reshape(*x.shape[:2], 3, self.num_heads, -1)
    if tokens is not None:  # one gather of q, k and v together into clip rows, one back
      q, k, v = jnp.unstack(layout.to_rows(qkv, tokens), axis=2)
      out = layout.from_rows(dot_product_attention(q, k, v, tokens.kept,
                                                   attention=self.attention), tokens)
    else:
      q, k, v = jnp.unstack(qkv, axis=2)
      out = dot_product_attention(q, k, v, None, bias=bias)
    out = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(
        out.reshape(x.shape))
    return out, qkv[:, :, 1]


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=trunc_normal, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # exact erf GELU; flax's default is the tanh one
    return nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(x)


class _BlockParts(nn.Module):
  """What every block variant shares: its settings and drop path (one Bernoulli per clip,
  applied to all its tokens). Submodule names (norm1, attn, norm2, mlp) are the same in every
  variant, so their parameters are interchangeable."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "xla"

  def _norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)

  def _residual(self, y, draws, owner, deterministic: bool, rate):
    """Dropout then drop path of a branch's output, to be added to the residual stream."""
    y = nn.Dropout(self.dropout)(y, deterministic)
    rate = self.drop_path if rate is None else rate  # a traced scalar under `model.scan`
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return y
    keep = 1.0 - rate
    scale = owner(jax.random.bernoulli(self.make_rng("dropout"), keep, draws).astype(y.dtype))
    return y * (scale / jnp.asarray(keep, y.dtype))[..., None]


class Block(_BlockParts):
  """A pre-norm block on the layout's slots (G, L, D); attention on one row per clip."""

  @nn.compact
  def layers(self, x, tokens: layout.TokenBatch, deterministic: bool, rate=None):
    draws = (tokens.plan.groups, tokens.plan.clips + 1)  # one per clip (index 0: padding)
    owner = lambda y: jnp.take_along_axis(y, tokens.clip, axis=1)
    y, _ = Attention(self.num_heads, self.dtype, self.attention, name="attn")(
        self._norm("norm1")(x), tokens)
    x = x + self._residual(y, draws, owner, deterministic, rate)
    y = Mlp(self.mlp_dim, self.dtype, name="mlp")(self._norm("norm2")(x))
    return x + self._residual(y, draws, owner, deterministic, rate)

  def __call__(self, x, tokens: layout.TokenBatch, deterministic: bool):
    return self.layers(x, tokens, deterministic)


class ScannedBlock(Block):
  """One step of the scanned block stack (`model.scan`): the drop-path rate arrives as the
  scanned input, so one block is traced and compiled for all `depth` of them."""

  def __call__(self, x, tokens: layout.TokenBatch, rate, deterministic: bool):
    return self.layers(x, tokens, deterministic, rate), None


class RowBlock(_BlockParts):
  """A pre-norm block on clip rows (R, C, D) for Token Merging: `size` (R, C) is each slot's
  token size (0: padding), attention is proportional to it, and `merge` tokens are merged
  after attention (`tome`). Returns (rows, sizes)."""

  @nn.compact
  def __call__(self, x, size, deterministic: bool, merge: int):
    draws, owner = (x.shape[0], 1), lambda y: jnp.broadcast_to(y, x.shape[:2])  # a row: a clip
    y, keys = Attention(self.num_heads, self.dtype, self.attention, name="attn")(
        self._norm("norm1")(x), bias=tome.attention_bias(size))
    x = x + self._residual(y, draws, owner, deterministic, None)
    if merge:
      matching = tome.bipartite_soft_matching(tome.metric_from_keys(keys), size > 0, merge)
      x, size = tome.merge(x, size, matching)
    y = Mlp(self.mlp_dim, self.dtype, name="mlp")(self._norm("norm2")(x))
    return x + self._residual(y, draws, owner, deterministic, None), size


class VisionTransformer(nn.Module):
  """VideoMAE-2 ViT over a `layout.TokenBatch`; returns per-clip logits (B, classes) float32.

  rngs: 'dropout' for dropout / drop path when training. remat: a `REMAT_POLICIES` name.
  scan: the blocks as one `nn.scan` with parameters stacked under 'blocks' (one block to trace
  and compile instead of `depth`: ViT-H/g); saved models stay unrolled (`arrange_blocks`).
  tome: tokens to merge in each block (Token Merging); all zero: off, and the code path is the
  plain one. With ToMe the tokens move to one row per clip first, and each block merges at
  most what `tome.schedule` allows on that batch's rows.
  """
  spec: ModelSpec
  dropout: float = 0.0
  drop_path: float = 0.0
  head_dropout: float = 0.0
  head_init_scale: float = 0.001
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  tome: tuple[int, ...] = ()
  scan: bool = False

  def setup(self):
    s = self.spec
    fan_in = s.tubelet_size * s.patch_size ** 2 * 3
    self.patch_embed = nn.DenseGeneral(
        s.width, axis=(-4, -3, -2, -1), dtype=self.dtype,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=_torch_default_uniform(fan_in), name="patch_embed")
    if s.length_embedding:
      self.length_table = self.param("length_embedding", trunc_normal, (s.grid[0], s.width))
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if len(self.tome) > s.depth:
      raise ValueError(f"model.tome has {len(self.tome)} entries for {s.depth} blocks")
    policy = REMAT_POLICIES[self.remat]
    if self.scan:
      if any(self.tome):
        raise ValueError("model.scan=True with ToMe: ToMe changes the token count from block "
                         "to block, a scan runs one shape through all; turn one of them off")
      step = ScannedBlock
      if self.remat != "none":  # argument 4 (`deterministic`, self counted) is a Python value
        step = nn.remat(ScannedBlock, policy=policy, static_argnums=(4,), prevent_cse=False)
      self.blocks = nn.scan(step, variable_axes={"params": 0}, length=s.depth,
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0, nn.broadcast))(
          s.num_heads, s.mlp_dim, 0.0, self.dropout, self.dtype, self.attention, name="blocks")
    else:
      # Python-valued arguments (self counted): `deterministic`, and `merge` of a row block
      block, static = (RowBlock, (3, 4)) if any(self.tome) else (Block, (3,))
      if self.remat != "none":
        block = nn.remat(block, policy=policy, static_argnums=static)
      self.blocks = [block(s.num_heads, s.mlp_dim, float(rate), self.dropout, self.dtype,
                           self.attention, name=f"blocks_{i}")
                     for i, rate in enumerate(self._drop_path_rates())]
    self.fc_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="fc_norm")
    self.head_drop = nn.Dropout(self.head_dropout)
    scaled = lambda init: lambda *a: init(*a) * self.head_init_scale
    self.head = nn.Dense(s.num_classes, kernel_init=scaled(trunc_normal), name="head")

  def __call__(self, tokens: layout.TokenBatch, *, train: bool = False) -> jax.Array:
    """Logits of each clip from its tokens alone: padding is neither attended nor pooled."""
    s = self.spec
    patches = tokens.patches.reshape(
        *tokens.patches.shape[:2], s.tubelet_size, s.patch_size, s.patch_size, 3)
    x = self.patch_embed(patches)
    x = x + jnp.asarray(sinusoid_table(s.num_tokens, s.width))[tokens.positions]
    if s.length_embedding:  # a one-hot matmul: its gradient is a matmul, not a scatter-add
      runs = jax.nn.one_hot(tokens.lengths - 1, s.grid[0], dtype=jnp.float32)  # 0: padding
      x = x + jnp.einsum("glt,td->gld", runs, jnp.asarray(self.length_table, jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    x = x.astype(self.dtype)
    if self.scan:
      rates = jnp.asarray(self._drop_path_rates(), jnp.float32)  # one per block, scanned over
      x, _ = self.blocks(x, tokens, rates, not train)
      pooled = layout.pool(x, tokens)
    elif not any(self.tome):
      for block in self.blocks:  # every argument positional: remat's static_argnums count them
        x = block(x, tokens, not train)
      pooled = layout.pool(x, tokens)
    else:
      x = layout.to_rows(x, tokens)
      size = (jnp.arange(x.shape[1]) < tokens.kept[:, None]).astype(jnp.float32)
      requested = tuple(self.tome) + (0,) * (s.depth - len(self.tome))
      # r per block, clipped to this batch's rows (C slots, fewer than N under RLT)
      for block, merge in zip(self.blocks, tome.schedule(requested, s.depth, x.shape[1])):
        x, size = block(x, size, not train, merge)
      pooled = tome.weighted_mean(x, size)
    return self.head(self.head_drop(self.fc_norm(pooled), not train))

  def _drop_path_rates(self) -> np.ndarray:
    return np.linspace(0.0, self.drop_path, self.spec.depth)


def arrange_blocks(params: Any, scan: bool) -> Any:
  """The same parameters with blocks as `model.scan` wants them: stacked under 'blocks'
  (scan=True) or one `blocks_i` per block (scan=False, the saved format). Either way in."""
  params = dict(params)
  if scan and "blocks_0" in params:
    depth = sum(1 for key in params if key.startswith("blocks_"))
    blocks = [params.pop(f"blocks_{i}") for i in range(depth)]
    on_device = isinstance(jax.tree_util.tree_leaves(blocks)[0], jax.Array)
    params["blocks"] = jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs) if on_device else np.stack(xs), *blocks)
  elif not scan and "blocks" in params:
    blocks = params.pop("blocks")
    depth = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    for i in range(depth):
      params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], blocks)
  return params


def example_tokens(spec: ModelSpec) -> layout.TokenBatch:
  """A one-clip token batch of every token: what `init` needs (parameters do not depend on
  the layout or the clip)."""
  frames = jnp.zeros((1, spec.num_frames, spec.image_size, spec.image_size, 3), jnp.float32)
  plan = layout.plan(np.asarray([spec.num_tokens]), layout.Layout("padded"),
                     num_tokens=spec.num_tokens, groups=1)
  return layout.tokenize(frames, jnp.ones((1, spec.num_tokens), bool), plan,
                         tubelet_size=spec.tubelet_size, patch_size=spec.patch_size)


def build(spec: ModelSpec, *, dtype: str = "float32", **runtime) -> VisionTransformer:
  """The model of `spec` with run-time settings (dtype by name, attention, remat, dropout…)."""
  if dtype not in DTYPES:
    raise ValueError(f"model.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  return VisionTransformer(spec=spec, dtype=DTYPES[dtype], **runtime)
