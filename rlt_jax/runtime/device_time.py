"""Where the device time of a few steps goes: a jax.profiler trace, read back and grouped.

`trace(directory)` records a profile (open it with TensorBoard's profile plugin or Perfetto);
`breakdown` sums the duration of every XLA operation the trace shows, per group, from the
compiled HLO of the executables that ran (an operation's group comes from what it computes and
from the JAX name stack in its metadata), and counts the device's idle time between them:

  matmuls            dots and convolutions (qkv, proj, MLP, patch embedding, head), cuBLAS calls
  attention fwd/bwd  the attention core (scores, softmax, weighted sum; cuDNN / splash kernels)
  gathers/scatters   token compaction, rows ↔ stream, embeddings, pooling gathers
  copies/concats     copy, transpose, concatenate, pad, slice, dynamic-update-slice
  norms/elementwise  LayerNorm, GELU, residuals, softmax outside attention, losses, reductions
  optimizer          AdamW, gradient norms, the finite check (ops under the 'optimizer' scope)
  phase 1            normalise, mix, erase, RLT mask and counts (the first phase of a step)
  idle               time inside the traced window when no operation ran

Works wherever jax.profiler does (CPU traces carry the same per-operation events as GPU ones).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
from typing import Iterable, Iterator

import jax

GROUPS = ("matmuls", "attention fwd", "attention bwd", "gathers/scatters", "copies/concats",
          "norms/elementwise", "optimizer", "phase 1", "other")
_MOVES = {"copy", "transpose", "concatenate", "pad", "slice", "dynamic-slice",
          "dynamic-update-slice", "reverse"}
_QUIET = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "broadcast",
          "iota", "reshape", "after-all", "partition-id", "replica-id"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


@contextlib.contextmanager
def trace(directory: str) -> Iterator[None]:
  """jax.profiler trace of the block into `directory` (TensorBoard layout)."""
  jax.profiler.start_trace(directory)
  try:
    yield
  finally:
    jax.profiler.stop_trace()


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str]]]:
  """computation name → [(instruction, opcode, rest of line)]."""
  out: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in hlo.splitlines():
    if not line.startswith(" "):
      m = _COMPUTATION.match(line)
      current = m.group(1) if m else None
      if current:
        out[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if current and m:
      out[current].append((m.group(1), m.group(2), m.group(3)))
  return out


def _called(rest: str) -> list[str]:
  return re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)


def _opcodes(computations, name: str, seen: set[str]) -> collections.Counter:
  """Opcodes inside a computation and everything it calls."""
  counts: collections.Counter = collections.Counter()
  if name in seen:
    return counts
  seen.add(name)
  for _, opcode, rest in computations.get(name, []):
    counts[opcode] += 1
    if opcode == "custom-call":
      counts["custom-call:" + _target(rest)] += 1
    for callee in _called(rest):
      counts += _opcodes(computations, callee, seen)
  return counts


def _target(rest: str) -> str:
  m = re.search(r'custom_call_target="([^"]*)"', rest)
  return m.group(1) if m else ""


def _group(opcode: str, rest: str, inner: collections.Counter) -> str:
  name = re.search(r'op_name="([^"]*)"', rest)
  name = name.group(1) if name else ""
  backward = "transpose(" in name
  targets = " ".join(k for k in inner if k.startswith("custom-call:")).lower()
  if "fmha" in targets or "splash" in targets or "dot_product_attention" in name:
    if "/optimizer" not in name:
      return "attention bwd" if backward or "backward" in targets else "attention fwd"
  if "/optimizer" in name:
    return "optimizer"
  if inner["dot"] or inner["convolution"] or "gemm" in targets or "matmul" in targets:
    return "matmuls"
  if inner["gather"] or inner["scatter"]:
    return "gathers/scatters"
  work = {k for k in inner if k not in _QUIET and not k.startswith("custom-call:")} - {"fusion"}
  if work and work <= _MOVES:
    return "copies/concats"
  if work or opcode not in _QUIET:
    return "norms/elementwise"
  return "other"


def classify(hlo_texts: Iterable[str], *, phase_1: bool = False) -> dict[tuple[str, str], str]:
  """(module name, instruction name) → group, for every instruction of these HLO modules
  (all of them 'phase 1' when `phase_1`)."""
  groups: dict[tuple[str, str], str] = {}
  for hlo in hlo_texts:
    module = re.search(r"^HloModule ([\w.\-]+)", hlo, re.M)
    module = module.group(1) if module else ""
    computations = _computations(hlo)
    for instructions in computations.values():
      for name, opcode, rest in instructions:
        if phase_1:
          groups[(module, name)] = "phase 1"
          continue
        inner = collections.Counter({opcode: 1})
        for callee in _called(rest):
          inner += _opcodes(computations, callee, set())
        if opcode == "custom-call":
          inner["custom-call:" + _target(rest)] += 1
        groups[(module, name)] = _group(opcode, rest, inner)
  return groups


def op_counts(hlo: str) -> collections.Counter:
  """How many instructions of each opcode a compiled HLO module holds, fused ones included
  (e.g. how many scatters a train step's backward pass runs)."""
  return collections.Counter(opcode for instructions in _computations(hlo).values()
                             for _, opcode, _ in instructions)


def _events(directory: str) -> list[dict]:
  """The newest trace under `directory`: its complete events."""
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"{directory}: no *.trace.json.gz (was a profile written there?)")
  with gzip.open(paths[-1]) as f:
    events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def breakdown(directory: str, *, phase_1: Iterable[str], phase_2: Iterable[str],
              steps: int) -> dict[str, float]:
  """Device milliseconds per step in each group (and 'idle', 'total') of the newest trace
  under `directory`, whose operations come from the executables whose HLO texts are given.

  'total' is the traced window from the first operation's start to the last one's end,
  divided by `steps`; 'idle' is the part of it when no operation was running.
  """
  groups = {**classify(phase_2), **classify(phase_1, phase_1=True)}
  events = _events(directory)
  if not events:
    raise ValueError(f"{directory}: the trace holds no XLA operations")
  ms: collections.Counter = collections.Counter()
  spans = []
  for e in events:
    args = e["args"]
    key = (args.get("hlo_module", ""), args["hlo_op"])
    ms[groups.get(key, "other")] += e["dur"] / 1e3
    spans.append((e["ts"], e["ts"] + e["dur"]))
  spans.sort()
  busy, end = 0.0, spans[0][0]
  for start, stop in spans:  # the union of operation intervals, over every stream/thread
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  window = end - spans[0][0]
  out = {group: ms[group] / steps for group in GROUPS if ms[group]}
  out["idle"] = (window - busy) / 1e3 / steps
  out["total"] = window / 1e3 / steps
  return out


def format_breakdown(name: str, result: dict[str, float]) -> str:
  """One line per group: ms per step and share of the operations' summed time."""
  busy = sum(v for k, v in result.items() if k not in ("idle", "total"))
  lines = [f"{name}: {result['total']:.2f} ms per step in the traced window, "
           f"{result['idle']:.2f} ms ({result['idle'] / result['total']:.1%}) idle"]
  for group in GROUPS:
    if group in result:
      lines.append(f"  {group:18s} {result[group]:9.2f} ms  {result[group] / busy:6.1%}")
  return "\n".join(lines)
