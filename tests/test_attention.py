"""models/attention.py: one attention function over rows of one clip each, valid tokens first.

Every implementation gives each real query softmax attention over its row's real keys only;
padding queries and empty rows stay finite (their outputs are discarded).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax.models import attention, tome
from rlt_jax.models.attention import dot_product_attention
from rlt_jax.runtime import sharding

# Splash runs in Pallas interpret mode off TPU: slow, so rows stay tiny.
LENGTHS = (50, 128, 0, 1, 127, 77, 128, 3)  # a full row, an empty one, a single token …


def inputs(lengths=LENGTHS[:4], length=128, heads=2, head_dim=8, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q, k, v = (jax.random.normal(key, (len(lengths), length, heads, head_dim), dtype)
             for key in keys)
  return q, k, v, jnp.asarray(lengths, jnp.int32)


def reference(q, k, v, lengths):
  """Each row's real tokens on their own, plain softmax attention in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros(q.shape, np.float64)
  for r, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    logits = np.einsum("qhd,khd->hqk", q[r, :n], k[r, :n]) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[r, :n] = np.einsum("hqk,khd->qhd", p, v[r, :n])
  return out


def real(lengths, length=128):
  """(R, C) True at real query positions."""
  return np.arange(length) < np.asarray(lengths)[:, None]


def assert_equal_on_real_queries(got, want, lengths, atol):
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()  # padding queries and empty rows included
  np.testing.assert_allclose(got[real(lengths)], np.asarray(want, np.float32)[real(lengths)],
                             atol=atol, rtol=0)


def test_xla_attends_to_each_rows_real_tokens_only():
  q, k, v, lengths = inputs()
  assert_equal_on_real_queries(dot_product_attention(q, k, v, lengths),
                               reference(q, k, v, lengths), lengths, atol=1e-5)


def test_keys_in_padding_change_nothing():
  q, k, v, lengths = inputs()
  pad = ~real(lengths)[..., None, None]
  noisy = [jnp.where(pad, 1e3, x) for x in (k, v)]
  assert_equal_on_real_queries(dot_product_attention(q, *noisy, lengths),
                               dot_product_attention(q, k, v, lengths), lengths, atol=0)


def test_bias_of_zero_and_large_negative_is_the_length_mask():
  q, k, v, lengths = inputs(lengths=(50, 128, 1, 127))
  for large in (-1e9, jnp.finfo(jnp.float32).min / 2):
    bias = jnp.where(jnp.asarray(real(lengths)), 0.0, large)
    assert_equal_on_real_queries(dot_product_attention(q, k, v, None, bias=bias),
                                 dot_product_attention(q, k, v, lengths), lengths, atol=1e-6)


def test_bias_is_added_to_each_keys_logit():
  """A bias of log 2 on a key weighs it as two copies of itself (ToMe's proportional
  attention): the same as attending over a row where that key appears twice."""
  q, k, v, _ = inputs(lengths=(6,), length=8)
  bias = jnp.asarray([[np.log(2.0), 0, 0, 0, 0, 0, -1e9, -1e9]])
  twice = lambda x: jnp.concatenate([x[:, :1], x[:, :6]], axis=1)
  want = dot_product_attention(twice(q), twice(k), twice(v), jnp.asarray([7]))[:, 1:]
  got = dot_product_attention(q, k, v, None, bias=bias)[:, :6]
  np.testing.assert_allclose(got, want, atol=1e-6)


def tome_bias(lengths, length, seed=1):
  """ToMe's proportional-attention bias: log of a token's size, padding (size 0) anywhere."""
  sizes = jax.random.randint(jax.random.PRNGKey(seed), (len(lengths), length), 0, 9)
  return tome.attention_bias(sizes.astype(jnp.float32)), np.asarray(sizes > 0)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2),
                                        (jnp.float16, 5e-3)])
def test_a_key_bias_as_extra_head_dims_is_the_dense_bias(dtype, atol):
  """What the fused kernels run for ToMe: the bias folded into q and k (two dims, hi + lo, so a
  16-bit bias stays exact to ~16 bits), head dims padded to a multiple of 8, unscaled."""
  q, k, v, lengths = inputs(lengths=(128,) * 4, head_dim=64, dtype=dtype)
  bias, live = tome_bias(lengths, 128)
  q2, k2, v2 = attention.key_bias_as_head_dims(q, k, v, bias)
  assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 72
  got = attention._xla_attention(q2, k2, v2, lengths, scale=1.0)[..., :64]
  want = dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), None, bias=bias)
  got, want = np.asarray(got, np.float32), np.asarray(want)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[live], want[live], atol=atol, rtol=0)


@pytest.mark.usefixtures("fresh_splash_kernels")
def test_splash_takes_a_key_bias_on_rows_of_any_length():
  """ToMe rows shrink block by block (here 100 slots): splash pads them to 128 with keys that
  get no weight and runs the bias as head dims."""
  q, k, v, lengths = inputs(lengths=(100,) * 2, length=100)
  bias, live = tome_bias(lengths, 100)
  want = dot_product_attention(q, k, v, None, bias=bias, attention="xla")
  got = jax.jit(lambda *a: dot_product_attention(*a, None, bias=bias, attention="splash"))(
      q, k, v)
  assert got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], atol=1e-5)


@pytest.fixture
def fresh_splash_kernels():
  """Each splash test builds its kernel itself (its reuse is tested on its own, below)."""
  cached = getattr(attention, "_splash_kernel", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()


@pytest.mark.usefixtures("fresh_splash_kernels")
def test_splash_matches_xla_in_interpret_mode():
  q, k, v, lengths = inputs()
  want = dot_product_attention(q, k, v, lengths, attention="xla")
  got = jax.jit(lambda *a: dot_product_attention(*a, attention="splash"))(q, k, v, lengths)
  assert_equal_on_real_queries(got, want, lengths, atol=1e-5)


@pytest.mark.usefixtures("fresh_splash_kernels")
def test_splash_under_a_mesh_runs_per_device_and_matches_xla():
  mesh = sharding.make_mesh()
  q, k, v, lengths = inputs(lengths=LENGTHS)  # one row per device
  want = dot_product_attention(q, k, v, lengths, attention="xla")
  splash = jax.jit(lambda *a: dot_product_attention(*a, attention="splash"))
  with jax.set_mesh(mesh):
    rows = jax.sharding.NamedSharding(mesh, sharding.BATCH)
    args = [jax.device_put(x, rows) for x in (q, k, v, lengths)]
    assert "shard_map" in str(jax.make_jaxpr(splash)(*args))
    got = splash(*args)
  assert len(got.sharding.device_set) == 8
  assert_equal_on_real_queries(got, want, lengths, atol=1e-5)


@pytest.mark.usefixtures("fresh_splash_kernels")
def test_splash_compiles_again_for_a_new_function_of_the_same_shape():
  """A second compilation (a new plan of the same capacity, the backward pass, eval after
  train) must not reuse values from the first one's trace."""
  q, k, v, lengths = inputs(lengths=(50, 128))
  want = dot_product_attention(q, k, v, lengths, attention="xla")
  first = jax.jit(lambda *a: dot_product_attention(*a, attention="splash"))(q, k, v, lengths)
  second = jax.jit(lambda *a: 2 * dot_product_attention(*a, attention="splash"))(q, k, v,
                                                                                  lengths)
  assert_equal_on_real_queries(first, want, lengths, atol=1e-5)
  assert_equal_on_real_queries(second, 2 * want, lengths, atol=2e-5)


def test_splash_rejects_rows_it_cannot_tile():
  q, k, v, lengths = inputs(length=96, lengths=(50, 96))
  with pytest.raises(ValueError, match="multiple of 128.*layout.capacity_step"):
    dot_product_attention(q, k, v, lengths, attention="splash")


def test_auto_picks_the_fused_kernel_of_the_backend_and_unknown_names_fail():
  backend = jax.default_backend()
  want = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
  assert attention.resolve("auto", jnp.bfloat16, 128) == want
  assert attention.resolve("auto", jnp.float32, 128) == ("splash" if backend == "tpu" else "xla")
  assert attention.resolve("auto", jnp.bfloat16, 100) == ("cudnn" if backend == "gpu" else "xla")
  if want == "xla":  # elsewhere the fused kernels have their own tests
    q, k, v, lengths = inputs()
    np.testing.assert_array_equal(dot_product_attention(q, k, v, lengths, attention="auto"),
                                  dot_product_attention(q, k, v, lengths))
  q, k, v, lengths = inputs()
  with pytest.raises(ValueError, match="model.attention='flash'"):
    dot_product_attention(q, k, v, lengths, attention="flash")


def test_gradients_reach_no_padding_key():
  q, k, v, lengths = inputs()
  loss = lambda k, v: jnp.sum(jnp.where(real(lengths)[..., None, None],
                                        dot_product_attention(q, k, v, lengths), 0) ** 2)
  g_k, g_v = jax.grad(loss, argnums=(0, 1))(k, v)
  pad = ~real(lengths)
  for g in (g_k, g_v):
    g = np.asarray(g)
    assert np.isfinite(g).all() and not g[pad].any() and g[~pad].any()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_matches_xla_in_16_bits(dtype):
  q, k, v, lengths = inputs(lengths=(70, 128, 0, 1), head_dim=64, dtype=dtype)
  want = dot_product_attention(q, k, v, lengths, attention="xla")
  got = dot_product_attention(q, k, v, lengths, attention="cudnn")
  assert_equal_on_real_queries(got, want, lengths, atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_takes_tomes_key_bias_in_16_bits():
  q, k, v, lengths = inputs(lengths=(100,) * 4, length=100, head_dim=64, dtype=jnp.bfloat16)
  bias, live = tome_bias(lengths, 100)
  want = dot_product_attention(q, k, v, None, bias=bias, attention="xla")
  got = dot_product_attention(q, k, v, None, bias=bias, attention="cudnn")
  np.testing.assert_allclose(np.asarray(got, np.float32)[live],
                             np.asarray(want, np.float32)[live], atol=2e-2, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_auto_is_cudnn_on_gpu_for_16_bit_inputs():
  assert attention.resolve("auto", jnp.bfloat16, 100) == "cudnn"
  assert attention.resolve("auto", jnp.float32, 128) == "xla"
