"""models/attention.py: one attention function, padding or segment ids, several backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax.models.attention import dot_product_attention


def inputs(batch=2, length=128, heads=2, head_dim=16, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim)) for key in keys)
  segments = np.zeros((batch, length), np.int32)
  segments[0, :50], segments[0, 50:90] = 1, 2  # two clips packed, then padding
  segments[1, :128] = 3  # one full clip
  return q, k, v, jnp.asarray(segments)


def reference(q, k, v, segments):
  """Each segment on its own, with plain softmax attention."""
  out = np.zeros(q.shape, np.float64)
  q, k, v, segments = (np.asarray(a, np.float64) for a in (q, k, v, segments))
  for b in range(q.shape[0]):
    for s in np.unique(segments[b]):
      idx = np.nonzero(segments[b] == s)[0]
      logits = np.einsum("qhd,khd->hqk", q[b, idx], k[b, idx]) / np.sqrt(q.shape[-1])
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, idx] = np.einsum("hqk,khd->qhd", p, v[b, idx])
  return out


def test_xla_attends_within_segments_only():
  q, k, v, segments = inputs()
  np.testing.assert_allclose(dot_product_attention(q, k, v, segments), reference(q, k, v, segments),
                             atol=1e-5)


def test_splash_with_segment_ids_matches_xla_in_interpret_mode():
  q, k, v, segments = inputs()
  want = dot_product_attention(q, k, v, segments, implementation="xla")
  got = dot_product_attention(q, k, v, segments, implementation="splash")
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_splash_rejects_lengths_it_cannot_tile():
  q, k, v, segments = inputs(length=96)
  with pytest.raises(ValueError, match="multiple of 128"):
    dot_product_attention(q, k, v, segments[:, :96], implementation="splash")


def test_auto_is_xla_on_cpu_and_unknown_names_fail():
  q, k, v, segments = inputs()
  np.testing.assert_array_equal(dot_product_attention(q, k, v, segments, implementation="auto"),
                                dot_product_attention(q, k, v, segments))
  with pytest.raises(ValueError, match="model.attention='flash'"):
    dot_product_attention(q, k, v, segments, implementation="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("padded", [True, False])
def test_cudnn_matches_xla_in_bfloat16(padded):
  q, k, v, segments = inputs()
  if padded:
    segments = jnp.where(jnp.arange(128) < jnp.array([[70], [128]]), 1, 0)
  lengths = (segments > 0).sum(-1).astype(jnp.int32) if padded else None
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  want = dot_product_attention(q, k, v, segments)
  got = dot_product_attention(q, k, v, segments, valid_lengths=lengths, implementation="cudnn")
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(got, np.float32)[real],
                             np.asarray(want, np.float32)[real], atol=2e-2)
