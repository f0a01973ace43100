"""The one attention function every block calls, over rows of tokens with segment ids.

Tokens attend only to tokens of the same segment. Segment 0 is padding: padding attends only
to padding, so no row is ever fully masked (no NaNs) and real tokens never see padding.

Implementations (config `model.attention`):
  'xla'    plain einsum + fp32 softmax; any backend; the reference.
  'cudnn'  `jax.nn.dot_product_attention(implementation='cudnn')` (GPU, bf16/fp16): padded
           batches pass sequence lengths (cuDNN skips padding), packed ones a segment mask.
  'splash' TPU Pallas splash attention with segment ids; it does not scale q, so we do.
           Off TPU it runs in Pallas interpret mode (slow; for checking only).
  'auto'   splash on a single TPU device when rows are multiples of 128, cudnn on GPU for
           16-bit inputs, else xla.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                          *, valid_lengths: jax.Array | None = None,
                          implementation: str = "xla") -> jax.Array:
  """Multi-head attention. q, k, v: (B, L, heads, head_dim); segment_ids: (B, L) int32.

  valid_lengths (B,): when given, each row's real tokens are its first valid_lengths slots
  and it holds a single segment (a padded batch), which lets cuDNN skip the padding.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={implementation!r}: expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    backend = jax.default_backend()
    if backend == "tpu" and q.shape[1] % 128 == 0 and jax.device_count() == 1:
      implementation = "splash"  # not yet wrapped in shard_map for multi-device meshes
    elif backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
      implementation = "cudnn"
    else:
      implementation = "xla"
  if implementation == "xla":
    return _xla_attention(q, k, v, segment_ids)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v, segment_ids, valid_lengths)
  return _splash_attention(q, k, v, segment_ids)


def _xla_attention(q, k, v, segment_ids):
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  logits = jnp.where(same, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _cudnn_attention(q, k, v, segment_ids, valid_lengths):
  if valid_lengths is not None:
    return jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=valid_lengths, key_value_seq_lengths=valid_lengths,
        implementation="cudnn")
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=same, implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  block = min(512, length)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_attention(q, k, v, segment_ids):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  batch, length, heads, head_dim = q.shape
  if length % 128:
    raise ValueError(f"splash attention needs a row length that is a multiple of 128, got "
                     f"{length}: set tokenizer.capacity / row_length accordingly")
  kernel = _splash_kernel(length, heads, jax.default_backend() != "tpu")
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # splash does not scale q itself
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, heads, L, d)
  out = jax.vmap(kernel)(to_heads_first(q), to_heads_first(k), to_heads_first(v),
                         splash.SegmentIds(q=segment_ids, kv=segment_ids))
  return to_heads_first(out)
