"""The two phases of every forward pass and train step, and the shapes they compile.

Phase 1 (jit, compiled once) prepares a batch on device and computes every clip's exact kept
count (B,). The host fetches those few integers and picks the static sizes that hold them (a
`layout.Plan`: exact per batch, or the cheapest of a fixed `layout.ShapeSet`). Phase 2 runs the
executable compiled ahead of time for that plan. Inference (`forward.Forward`), training
(`train.TrainStep`) and the benchmark all run through `TwoPhase`.

Overlap: `begin` dispatches phase 1 and starts copying its counts to the host; `finish` plans
and dispatches phase 2. Calling `begin` for the next batch before `finish` of this one (as
`forward.Forward.map` and the training loop do) lets the host plan the next step while the
device is still running this one, so the device does not wait for the host between steps.

Compilation: every plan's phase 2 is compiled once (`compile`), and the seconds it took are
kept per plan, so that a timing can leave compilation out and report it apart.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import numpy as np

from rlt_jax import layout


@dataclasses.dataclass
class Pending:
  """A dispatched phase 1: its device outputs and the kept counts on their way to the host."""
  outputs: Any
  counts: jax.Array

  def host_counts(self) -> np.ndarray:
    return np.asarray(self.counts)


class TwoPhase:
  """first(*inputs) → (outputs, counts (B,)); second(carry, outputs, plan) → result.

  `planner` maps host counts to a plan. `donate` donates the carry (a train state) to phase 2.
  """

  def __init__(self, first: Callable, second: Callable, planner: Callable[[np.ndarray],
               layout.Plan], *, mesh: jax.sharding.Mesh | None = None,
               first_shardings: Any = None, second_shardings: Any = None,
               donate: bool = False):
    self.planner, self.mesh = planner, mesh
    self._first = jax.jit(first, out_shardings=first_shardings)
    self._second_fn, self._second_name = second, getattr(second, "__name__", "phase_2")
    self._second_options = dict(static_argnums=2, donate_argnums=(0,) if donate else (),
                                out_shardings=second_shardings)
    self.executables: dict[layout.Plan, Any] = {}
    self.compile_seconds: dict[layout.Plan, float] = {}
    self.uses: collections.Counter = collections.Counter()

  @property
  def plans(self) -> set[layout.Plan]:
    """Every plan compiled so far."""
    return set(self.executables)

  def begin(self, *inputs) -> Pending:
    with self.context():
      outputs, counts = self._first(*inputs)
    counts.copy_to_host_async()
    return Pending(outputs, counts)

  def plan(self, pending: Pending) -> layout.Plan:
    return self.planner(pending.host_counts())

  def compile(self, plan: layout.Plan, carry: Any, outputs: Any) -> Any:
    """Phase 2's executable for `plan` (compiled now if it is new); arguments give shapes."""
    if plan not in self.executables:
      start = time.perf_counter()
      # one name per plan (jit_<name>_<k>), so that a profile can tell their operations apart
      second = functools.wraps(self._second_fn)(lambda *args: self._second_fn(*args))
      second.__name__ = f"{self._second_name}_{len(self.executables)}"
      with self.context():
        self.executables[plan] = jax.jit(second, **self._second_options).lower(
            carry, outputs, plan).compile()
      self.compile_seconds[plan] = time.perf_counter() - start
    return self.executables[plan]

  def phase_1_hlo(self, *inputs) -> str:
    """The compiled HLO text of phase 1 for these inputs (for `device_time`)."""
    with self.context():
      return self._first.lower(*inputs).compile().as_text()

  def finish(self, carry: Any, pending: Pending) -> tuple[Any, layout.Plan]:
    """(phase 2's result, the plan it ran); dispatched, not waited for."""
    plan = self.plan(pending)
    executable = self.compile(plan, carry, pending.outputs)
    self.uses[plan] += 1
    return executable(carry, pending.outputs), plan

  def __call__(self, carry: Any, *inputs) -> tuple[Any, layout.Plan, np.ndarray]:
    """Both phases at once: (result, plan, host counts)."""
    pending = self.begin(*inputs)
    result, plan = self.finish(carry, pending)
    return result, plan, pending.host_counts()

  def context(self):
    """`jax.set_mesh(mesh)` (kernels such as splash shard_map over it), or nothing."""
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
