"""The one attention function every block calls: rows of one clip each, valid tokens first.

Row r holds `lengths[r]` real tokens followed by padding. Real tokens attend only to real
tokens of their row; padding queries get finite values that the caller discards; a row with
no tokens (batch padding) stays finite too.

Implementations (config `model.attention`):
  'xla'    plain einsum + fp32 softmax with a key-length mask; any backend; the reference.
  'cudnn'  `jax.nn.dot_product_attention(implementation='cudnn')` with per-row sequence
           lengths, so cuDNN skips the padding (GPU, bf16/fp16).
  'splash' TPU Pallas splash attention with segment ids (real 1, padding 0); it does not
           scale q, so we do. Under a mesh set with `jax.set_mesh` (the trainer and evaluator
           do) the kernel runs per device in `shard_map` over the batch axes, so pod slices use
           it too. Off TPU it runs in Pallas interpret mode (for checking only).
  'auto'   splash on TPU when rows are multiples of 128, cudnn on GPU for 16-bit inputs,
           else xla.

A per-key bias (ToMe's proportional attention, log of each token's size) runs through the same
kernels: with q' = [q/√d, 1, 1, 0 …] and k' = [k, hi, lo, 0 …], hi + lo = the bias split into
two numbers of k's dtype (so a bf16 bias keeps ~16 bits), and v' = [v, 0 …], the fused kernel at
scale 1 computes q·k/√d + bias as the dense-bias XLA path does (to rounding), for 2–8 more head
dims (64 → 72) rather than a dense (R, heads, C, C) bias. Splash rows are padded to a multiple
of 128, the padding hidden by the kernel's length mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlt_jax.runtime import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")


def resolve(attention: str, dtype, length: int) -> str:
  """The implementation 'auto' picks for this backend, dtype and row length."""
  if attention not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={attention!r}: expected one of {IMPLEMENTATIONS}")
  if attention != "auto":
    return attention
  backend = jax.default_backend()
  if backend == "tpu" and length % 128 == 0:
    return "splash"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                          attention: str = "xla", bias: jax.Array | None = None) -> jax.Array:
  """Multi-head attention. q, k, v: (R, C, heads, head_dim); lengths (R,) int32.

  bias (R, C), if given, is added to every query's logit of each key instead of the length
  mask (ToMe's proportional attention, whose real tokens need not come first); 'xla' adds it
  to dense logits, the fused kernels take it as extra head dims (module docstring).
  """
  with jax.named_scope("dot_product_attention"):  # device_time groups the core by this name
    if bias is not None:  # splash tiles rows by 128, and ToMe's rows shrink block by block
      tiled = q.shape[1] + (-q.shape[1]) % 128
      attention = resolve(attention, q.dtype, tiled)
      if attention == "xla":
        return _xla_attention(q, k, v, None, bias)
      return _fused_with_key_bias(q, k, v, bias, attention,
                                  tiled if attention == "splash" else q.shape[1])
    attention = resolve(attention, q.dtype, q.shape[1])
    if attention == "xla":
      return _xla_attention(q, k, v, lengths)
    if attention == "cudnn":
      return _cudnn_attention(q, k, v, lengths)
    return _splash_attention(q, k, v, lengths)


def key_bias_as_head_dims(q, k, v, bias, multiple: int = 8):
  """(q', k', v') whose unscaled attention equals q, k, v's scaled attention plus `bias` (R, C)
  on each key's logits (module docstring); head dims padded to a multiple of `multiple`."""
  head_dim = q.shape[-1]
  extra = 2 + (-(head_dim + 2)) % multiple
  # padding's −∞ as a finite value of k's dtype, far from overflow in a kernel's own scaling
  floor = max(float(jnp.finfo(k.dtype).min) / 2, -1e30)
  bias = jnp.maximum(bias.astype(jnp.float32), floor)
  hi = bias.astype(k.dtype)
  lo = (bias - hi.astype(jnp.float32)).astype(k.dtype)

  def append(x, tail):  # tail (R, C, extra), the same for every head
    tail = jnp.broadcast_to(tail[:, :, None, :], x.shape[:-1] + (extra,)).astype(x.dtype)
    return jnp.concatenate([x, tail], axis=-1)

  zeros = jnp.zeros(bias.shape + (extra - 2,), jnp.float32)
  ones = jnp.ones(bias.shape + (2,), jnp.float32)
  q = append(q * jnp.asarray(head_dim ** -0.5, q.dtype), jnp.concatenate([ones, zeros], -1))
  k = append(k, jnp.concatenate([hi[..., None], lo[..., None], zeros.astype(k.dtype)], -1))
  return q, k, append(v, jnp.zeros(bias.shape + (extra,), v.dtype))


def _fused_with_key_bias(q, k, v, bias, attention: str, slots: int):
  """The bias as head dims, on rows padded to `slots` (splash: a multiple of 128) whose padding
  the kernel's own length mask hides."""
  rows, length, _, head_dim = q.shape
  pad = lambda x: jnp.pad(x, ((0, 0), (0, slots - length)) + ((0, 0),) * (x.ndim - 2))
  q, k, v = key_bias_as_head_dims(pad(q), pad(k), pad(v), pad(bias))
  lengths = jnp.full((rows,), length, jnp.int32)
  if attention == "cudnn":
    out = _cudnn_attention(q, k, v, lengths, scale=1.0)
  else:
    out = _splash_attention(q, k, v, lengths, scale=1.0)
  return out[:, :length, :, :head_dim]


def _xla_attention(q, k, v, lengths, bias=None, scale=None):
  q = q * jnp.asarray(q.shape[-1] ** -0.5 if scale is None else scale, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias[:, None, None, :].astype(jnp.float32)
  else:
    real = jnp.arange(k.shape[1]) < lengths[:, None]
    logits = jnp.where(real[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _cudnn_attention(q, k, v, lengths, scale=None):
  lengths = jnp.maximum(lengths, 1).astype(jnp.int32)  # an empty row: its output is discarded
  return jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=lengths,
                                      key_value_seq_lengths=lengths, implementation="cudnn")


def _splash_kernel(length: int, heads: int, interpret: bool):
  # imported on use: the Pallas TPU kernels are a large import that only 'splash' needs
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  block = min(512, length)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_attention(q, k, v, lengths, scale=None):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # as above
  batch, length, heads, head_dim = q.shape
  if length % 128:
    raise ValueError(f"splash attention needs rows whose length is a multiple of 128, got "
                     f"{length}: set layout.capacity_step to a multiple of 128")
  # Built per trace, never cached: the kernel object holds arrays of the trace that built it.
  kernel = _splash_kernel(length, heads, jax.default_backend() != "tpu")
  # splash does not scale q itself
  q = q * jnp.asarray(head_dim ** -0.5 if scale is None else scale, q.dtype)
  segments = (jnp.arange(length) < lengths[:, None]).astype(jnp.int32)
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (R, heads, C, d)

  def local(q, k, v, segments):
    out = jax.vmap(kernel)(to_heads_first(q), to_heads_first(k), to_heads_first(v),
                           splash.SegmentIds(q=segments, kv=segments))
    return to_heads_first(out)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, k, v, segments)
  rows = P(tuple(a for a in sharding.AXES if a in mesh.axis_names))
  return jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows,
                       check_vma=False)(q, k, v, segments)
