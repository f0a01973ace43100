"""device_time.py: a jax.profiler trace read back, each operation's time in its group."""

import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax.runtime import device_time


def step(w, x, idx):
  """A matmul, a gather, a copy-like transpose, element-wise work and an 'optimizer' scope."""
  y = jnp.tanh(x @ w)
  z = y[idx]
  t = jnp.transpose(z).copy()
  with jax.named_scope("optimizer"):
    w = w - 0.1 * jnp.sign(w)
  return w, t.sum() + jnp.exp(y).mean()


def test_groups_come_from_what_each_operation_computes():
  w = jnp.ones((64, 64)); x = jnp.ones((128, 64)); idx = jnp.arange(100) % 128
  hlo = jax.jit(step).lower(w, x, idx).compile().as_text()
  groups = set(device_time.classify([hlo]).values())
  assert {"matmuls", "optimizer"} <= groups
  assert groups <= set(device_time.GROUPS)
  assert set(device_time.classify([hlo], phase_1=True).values()) == {"phase 1"}


def test_a_cpu_trace_is_grouped_with_its_idle_time(tmp_path):
  w = jnp.asarray(np.random.RandomState(0).normal(size=(256, 256)), jnp.float32)
  x = jnp.ones((512, 256)); idx = jnp.arange(300) % 512
  compiled = jax.jit(step).lower(w, x, idx).compile()
  jax.block_until_ready(compiled(w, x, idx))
  with device_time.trace(str(tmp_path)):
    for _ in range(3):
      w, out = compiled(w, x, idx)
      jax.block_until_ready(out)
  result = device_time.breakdown(str(tmp_path), phase_1=[], phase_2=[compiled.as_text()],
                                 steps=3)
  assert result["matmuls"] > 0 and result["total"] > 0 and 0 <= result["idle"] < result["total"]
  busy = sum(v for k, v in result.items() if k not in ("idle", "total"))
  assert busy > 0.5 * (result["total"] - result["idle"])  # what ran is what was counted
  text = device_time.format_breakdown("toy", result)
  assert "matmuls" in text and "idle" in text
