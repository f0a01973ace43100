"""two_phase.py: phase 1 → host counts → plan → phase 2, each plan compiled once, overlap safe."""

import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import layout
from rlt_jax.training import two_phase


def driver(**kwargs):
  """Phase 1 squares the inputs and counts the positive ones; phase 2 sums the first
  `plan.length` squares into the carry."""
  first = lambda x: (x * x, (x > 0).sum(-1, dtype=jnp.int32))
  second = lambda carry, y, plan: carry + y[:, :plan.length].sum()
  planner = lambda counts: layout.Plan("stream", 1, 1, int(counts.max()), 1, 8)
  return two_phase.TwoPhase(first, second, planner, **kwargs)


def test_both_phases_run_at_the_plan_of_the_exact_counts():
  d = driver()
  x = jnp.asarray([[1.0, 2.0, -1.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
  result, plan, counts = d(jnp.float32(0), x)
  assert counts.tolist() == [2, 1] and plan.length == 2
  assert float(result) == 1 + 4 + 9 + 0  # the first two squares of each row


def test_each_plan_compiles_once_and_its_seconds_are_kept():
  d = driver()
  for x in ([[1.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 5.0, 5.0]]):
    d(jnp.float32(0), jnp.asarray(x))
  assert {p.length for p in d.plans} == {1, 2}
  assert set(d.compile_seconds) == d.plans and all(s > 0 for s in d.compile_seconds.values())
  assert sum(d.uses.values()) == 4


def test_the_next_phase_1_may_run_before_this_phase_2():
  """Overlapped as the training loop runs it (begin k+1, then finish k): same results as one
  step after another, with a donated carry."""
  xs = [jnp.asarray(np.random.RandomState(i).normal(size=(2, 6)), jnp.float32)
        for i in range(5)]
  plain = driver()
  carry = jnp.zeros(())
  for x in xs:
    carry, _, _ = plain(carry, x)
  overlapped = driver(donate=True)
  total, ahead = jnp.zeros(()), overlapped.begin(xs[0])
  for k in range(len(xs)):
    pending = ahead
    ahead = overlapped.begin(xs[k + 1]) if k + 1 < len(xs) else None
    total, _ = overlapped.finish(total, pending)
  np.testing.assert_allclose(float(total), float(carry), rtol=1e-6)


def test_compile_ahead_then_run_compiles_nothing_more():
  d = driver()
  x = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
  pending = d.begin(x)
  plan = d.plan(pending)
  d.compile(plan, jnp.float32(0), pending.outputs)
  seconds = dict(d.compile_seconds)
  d.finish(jnp.float32(0), d.begin(x))
  assert d.compile_seconds == seconds and d.uses[plan] == 1
