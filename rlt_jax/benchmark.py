"""Throughput measurements. Speed targets live here, never in timed tests.

    python -m rlt_jax.benchmark clips VIDEO... --output clips.npy   # real clips, 16 × 224²
    python -m rlt_jax.benchmark model [--variant B/16] [--batch 32] [--dtype bfloat16]
        [--frames clips.npy [--draw N] | --source synthetic|DATA_GLOB] [--threshold 0.1]
        [--tome R,…] [--no_train] [--scan] [--profile DIR] [--tiny] [--only NAMES]
        [--output results.json]
    python -m rlt_jax.benchmark data [--videos 8] [--seconds 10]
    python -m rlt_jax.benchmark compile [--variant L/16] [--remat full]
    python -m rlt_jax.benchmark ops [--variant B/16] [--batch 32] [--frames clips.npy]

`model`: forward (inference, `forward.Forward`) and train-step (the trainer's own
`train.TrainStep`: augmentation, forward, backward, AdamW) throughput for: all tokens; RLT in
the 'padded' and 'stream' layouts, with clips in their given order and grouped by kept count
(as evaluation, predict and training batch them); random dropping at RLT's mean budget; ToMe
at each r of `--tome` (-1: the budget matched to RLT's; e.g. `--tome=-1,65` adds the release's
r = 65), alone and after RLT. Per setting, forward and train: clips/s, kept
tokens/s, tokens kept, speedup over all tokens, the ideal speedup (FLOPs of every clip's own
tokens, no padding: so the layout cannot inflate it), efficiency = achieved / ideal, shapes,
compile seconds, MFU where the device's peak is known, and RLT's own overhead (normalise +
mask + counts, ms and % of the forward pass). The train columns count the tokens the train
step kept (after mixing and erasing), not the forward pass's. Every shape is compiled before
the clock starts; one warm-up loop; device synchronised; medians over repeats. `--profile DIR`
adds where the device time goes (`device_time`). `--tiny` runs a one-block tiny ViT on small
clips (CPU, < 1 min) and asserts nothing about speed.

`ops`: how many gathers, scatters, copies, concatenates … the compiled train step of one batch
under RLT runs (its HLO, forward and backward).

`compile`: seconds to compile one training forward + backward (one clip of all tokens, bf16)
with the blocks unrolled and with `model.scan`, which traces and compiles one block for all.

`data`: the TFRecord converter (videos/s) and the training input pipeline (16 × 224² clips at
stride 4 from 256-short-side JPEG frames, random resized crop + flip) on generated H.264
videos (480 × 360, 25 fps, a moving square over a textured background). Rates are per CPU
core: work done divided by the CPU seconds of this process and its workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlt_jax import layout, rlt
from rlt_jax.data import build_tfrecords, input_pipeline, video
from rlt_jax.models import tome, vit
from rlt_jax.runtime import device_time, files, sharding
from rlt_jax.training import augment, forward, optim, recipes, train, two_phase

# Dense bf16 peak FLOP/s by device kind (vendor figures), for MFU.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def _cpu_seconds() -> float:
  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                   resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def data(num_videos: int = 8, seconds: float = 10.0, batches: int = 20) -> dict:
  """Converter videos/s and pipeline clips/s, each per CPU core."""
  with tempfile.TemporaryDirectory() as tmp:
    videos = []
    for i in range(num_videos):
      videos.append(os.path.join(tmp, f"v{i}.mp4"))
      video.write_moving_square(videos[-1], frames=int(25 * seconds), height=360, width=480,
                                texture=8, seed=i)
    entries = [build_tfrecords.Entry(p, i % 2, str(i % 2), f"v{i}") for i, p in enumerate(videos)]
    cpu, wall = _cpu_seconds(), time.perf_counter()
    build_tfrecords.build(entries, ["0", "1"], output_dir=os.path.join(tmp, "out"),
                          split="train", num_shards=1, workers=1)
    convert_cpu, convert_wall = _cpu_seconds() - cpu, time.perf_counter() - wall

    # Per core: the training transform (read, parse, decode, crop) run inline on one core.
    patterns = os.path.join(tmp, "out", "train.tfrecord-*")
    source = input_pipeline.RecordSource(input_pipeline.list_shards(patterns))
    transform = input_pipeline.Transform(input_pipeline.Sampling(), "train")
    rng = np.random.default_rng(0)
    clips = 8 * batches
    transform(source[0], rng)  # warm-up
    cpu = _cpu_seconds()
    for i in range(clips):
      transform(source[i % len(source)], rng)
    pipeline_cpu = _cpu_seconds() - cpu
    # End to end, batched through grain with its default threads on every core.
    iterator = iter(input_pipeline.make_dataset(patterns, mode="train",
                                                sampling=input_pipeline.Sampling(), batch_size=8))
    next(iterator)
    wall = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    pipeline_wall = time.perf_counter() - wall
  return {
      "converter_videos_per_core_s": num_videos / convert_cpu,
      "converter_videos_per_s": num_videos / convert_wall,
      "video": f"{seconds:g} s, 480x360, 25 fps H.264 → short side 256, JPEG q90",
      "pipeline_clips_per_core_s": clips / pipeline_cpu,
      "pipeline_clips_per_s": clips / pipeline_wall,
      "clip": "16 x 224 x 224, stride 4, random resized crop + flip, uint8",
      "cpu_count": os.cpu_count(),
  }


def forward_flops(spec: vit.ModelSpec, tokens: np.ndarray, merges: tuple[int, ...] = ()
                  ) -> float:
  """FLOPs of the forward pass of clips with these token counts (each clip alone, no padding):
  patch embedding, qkv/proj/MLP matmuls (linear in n) and the two attention matmuls (n²).
  With ToMe, block l runs on n − r_1 − … − r_{l−1} tokens (its own merge follows attention)."""
  n = np.asarray(tokens, np.float64)
  flops = float(np.sum(2 * n * spec.tubelet_size * spec.patch_size ** 2 * 3 * spec.width))
  merged = np.zeros_like(n)
  for layer in range(spec.depth):
    size = np.maximum(n - merged, 1)
    flops += layout.block_flops(size, spec.width, spec.mlp_dim)
    merged = merged + np.minimum(merges[layer] if layer < len(merges) else 0, size // 2)
  return flops


def synthetic_clips(count: int, *, num_frames: int, size: int, seed: int = 0) -> np.ndarray:
  """Clips with the spread of motion real video has: static shots, slow and fast pans, a
  moving object on a still background, handheld shake and busy scenes, in equal shares."""
  rng = np.random.default_rng(seed)
  big = video.resize(rng.integers(0, 256, (size // 6, size // 6, 3), np.uint8),
                     (2 * size, 2 * size))
  clips = []
  for i in range(count):
    kind = i % 6
    frames = []
    for t in range(num_frames):
      if kind == 0:    # static shot (sensor noise only)
        y = x = 0
      elif kind == 1:  # slow pan
        y, x = 0, t
      elif kind == 2:  # fast pan
        y, x = t, 6 * t
      elif kind == 3:  # one moving object, still background
        y = x = 0
      elif kind == 4:  # handheld shake
        y, x = rng.integers(0, 3, 2)
      else:            # busy: everything changes
        y, x = rng.integers(0, size, 2)
      frame = big[y:y + size, x:x + size].astype(np.int16)
      if kind == 3:
        top, left = size // 3, (8 * t) % (size - size // 4)
        frame[top:top + size // 4, left:left + size // 4] = (220, 40, 40)
      frame += rng.integers(-2, 3, frame.shape, dtype=np.int16)
      frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    clips.append(np.stack(frames))
  return np.stack(clips)


def _clips(spec: vit.ModelSpec, source: str, count: int, seed: int = 0) -> np.ndarray:
  """uint8 clips at the model's shape: synthetic clips or centre views of TFRecords."""
  if source == "synthetic":
    return synthetic_clips(count, num_frames=spec.num_frames, size=spec.image_size, seed=seed)
  sampling = input_pipeline.Sampling(num_frames=spec.num_frames, image_size=spec.image_size)
  clips = []
  for batch in input_pipeline.make_dataset(source, mode="eval", sampling=sampling,
                                           batch_size=1):
    clips.append(batch["frames"][0])
    if len(clips) == count:
      break
  return np.stack(clips)


def load_frames(path: str, spec: vit.ModelSpec) -> np.ndarray:
  """uint8 clips (N, T, H, W, 3) from a .npy, checked against the model's clip shape."""
  try:
    frames = np.load(path, allow_pickle=False, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise ValueError(f"--frames {path}: not a readable .npy array ({e})") from None
  want = (spec.num_frames, spec.image_size, spec.image_size, 3)
  if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 5 \
      or frames.shape[1:] != want or len(frames) == 0:
    got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else "an archive"
    raise ValueError(f"--frames {path}: expected uint8 clips (N, {', '.join(map(str, want))}) "
                     f"with N ≥ 1, got {got}")
  return np.asarray(frames)


def _median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# The settings of `benchmark model`, in order (ToMe's, named with their r, follow).
SETTINGS = ("none", "rlt padded, unsorted", "rlt padded, sorted", "rlt stream, unsorted",
            "rlt stream, sorted", "random")


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  policy: rlt.Policy
  layout: layout.Layout
  sort: bool = True
  tome: int = 0


@dataclasses.dataclass
class Timing:
  """What one timed loop of two-phase steps measured (compilation left out)."""
  seconds: float           # median over repeats of the whole loop
  counts: np.ndarray       # kept tokens of every clip of every timed step, as the step ran them
  plans: int               # distinct static shapes the loop ran
  compile_s: float         # seconds spent compiling them (before timing)


def _run_loop(driver: two_phase.TwoPhase, carry, inputs: list[tuple], *, advance: bool
              ) -> tuple[Any, list[two_phase.Pending]]:
  """Every input's two phases, the next phase 1 dispatched before this phase 2 (as training
  and evaluation run); `advance`: each result is the next carry (a train state)."""
  pendings, ahead, result = [], driver.begin(*inputs[0]), None
  for i in range(len(inputs)):
    pending = ahead
    ahead = driver.begin(*inputs[i + 1]) if i + 1 < len(inputs) else None
    result, _ = driver.finish(carry, pending)
    carry = result[0] if advance else carry
    pendings.append(pending)
  jax.block_until_ready(result)
  return carry, pendings


def _time_loop(driver: two_phase.TwoPhase, carry, inputs: list[tuple], *, advance: bool,
               repeats: int) -> tuple[Timing, Any]:
  """Compile every plan the loop needs, warm up once, then time `repeats` whole loops."""
  for args in inputs:
    pending = driver.begin(*args)
    driver.compile(driver.plan(pending), carry, pending.outputs)
  compile_s = sum(driver.compile_seconds.values())
  carry, _ = _run_loop(driver, carry, inputs, advance=advance)  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    carry, pendings = _run_loop(driver, carry, inputs, advance=advance)
    times.append(time.perf_counter() - start)
  counts = np.concatenate([p.host_counts() for p in pendings])
  return Timing(float(np.median(times)), counts, len({driver.plan(p) for p in pendings}),
                compile_s), carry


def _profile(directory: str, driver: two_phase.TwoPhase, carry, inputs: list[tuple], *,
             advance: bool) -> dict[str, float]:
  """Trace one steady-state pass of the loop (every plan already compiled and warmed up) into
  `directory` and group its device time per step."""
  carry, _ = _run_loop(driver, carry, inputs, advance=advance)
  with device_time.trace(directory):
    _run_loop(driver, carry, inputs, advance=advance)
  return device_time.breakdown(
      directory, phase_1=[driver.phase_1_hlo(*inputs[0])],
      phase_2=[e.as_text() for e in driver.executables.values()], steps=len(inputs))


def model_benchmark(variant: str = "B/16", batch: int = 32, dtype: str = "bfloat16",
                    source: str = "synthetic", frames_path: str | None = None,
                    threshold: float = 0.1, batches: int = 4, repeats: int = 3,
                    tiny: bool = False, train_steps: bool = True, tome_r: tuple[int, ...] = (),
                    only: tuple[str, ...] = (), draw: int = 0, profile: str | None = None,
                    scan: bool = False) -> dict:
  """clips/s, kept tokens/s, speedups, efficiency, overhead and MFU for each policy × layout.

  Forward passes and train steps run through the same two-phase driver as evaluation and
  training (phase 1 of the next batch dispatched before phase 2 of this one). Every plan a
  timed loop needs is compiled first and its seconds reported apart; a warm-up loop runs
  before the timed ones. Train steps use the trainer's own `train.TrainStep` (augmentation,
  forward, backward, AdamW), each batch at `repeats` step indices (so new mixing, erasing and
  kept counts each time, as in a run), at shapes chosen as a run chooses them
  (`layout.choose_shapes` from those steps' counts); their ideal is computed from the kept
  counts the train step actually ran. `draw` > 0 draws that many clips from `frames_path`
  with replacement (seed 0). `profile`: a directory for jax.profiler traces of a few
  steady-state steps of the all-token and default RLT settings, with their device time grouped.
  """
  overrides = {}
  if tiny:
    variant, dtype, overrides = "tiny", "float32", dict(image_size=64, num_frames=8, depth=1)
    batch, batches, repeats = 4, 2, 2
  spec = vit.ModelSpec.from_variant(variant, num_classes=400, **overrides)
  model = vit.build(spec, dtype=dtype, attention="auto", scan=scan)
  if frames_path:
    clips = load_frames(frames_path, spec)
    if draw:
      clips = clips[np.random.default_rng(0).choice(len(clips), size=draw)]
    batches = len(clips) // batch
    if batches == 0:
      raise ValueError(f"--frames {frames_path}: {len(clips)} clips"
                       f"{' drawn' if draw else ''}, fewer than one batch of {batch}")
    clips = clips[:batches * batch]
  else:
    clips = _clips(spec, source, batch * batches)
  n = spec.num_tokens
  rlt_policy = rlt.Policy("rlt", threshold)
  kept = rlt.kept_counts(clips, rlt_policy, tubelet_size=spec.tubelet_size,
                         patch_size=spec.patch_size)
  fraction = float(kept.mean()) / n
  matched = [_tome_matching(spec, float(kept.mean())) if r == -1 else r for r in tome_r]
  tome_budgets = dict.fromkeys(r for r in matched if r)  # r = 0 (e.g. matched on tiny): no ToMe
  stream, padded = layout.Layout("stream"), layout.Layout("padded")
  random_policy = rlt.Policy("random", keep_fraction=max(fraction, 1 / n))
  settings = [Setting(name, *how) for name, how in zip(SETTINGS, [
      (rlt.Policy("none"), padded, False), (rlt_policy, padded, False), (rlt_policy, padded),
      (rlt_policy, stream, False), (rlt_policy, stream), (random_policy, padded)])]
  for r in tome_budgets:
    settings += [Setting(f"tome r={r}", rlt.Policy("none"), padded, tome=r),
                 Setting(f"rlt+tome r={r}", rlt_policy, padded, tome=r)]
  if only:  # the all-token baseline always runs: every ratio is against it
    settings = [settings[0]] + [s for s in settings[1:] if s.name.startswith(only)]
  rng = jax.random.PRNGKey(0)
  params = jax.jit(lambda: model.init(rng, vit.example_tokens(spec))["params"])()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  kind = jax.devices()[0].device_kind
  peak = PEAK_FLOPS.get(kind) if dtype == "bfloat16" else None
  full_flops = forward_flops(spec, np.full(batch, n))  # per batch of all tokens

  results, breakdowns = [], {}
  for setting in settings:
    counts = rlt.kept_counts(clips, setting.policy, tubelet_size=spec.tubelet_size,
                             patch_size=spec.patch_size)
    order = input_pipeline.order_by_cost(counts) if setting.sort else np.arange(len(clips))
    chunks = [jnp.asarray(clips[order[i * batch:(i + 1) * batch]]) for i in range(batches)]
    run_model = (model.clone(tome=_schedule(spec, setting.tome), scan=False) if setting.tome
                 else model)  # ToMe changes the token count from block to block: no scan
    run_params = vit.arrange_blocks(params, run_model.scan)
    merges = _schedule(spec, setting.tome) if setting.tome else ()
    fwd = forward.Forward(run_model, setting.policy, setting.layout)
    valid = np.ones(batch, bool)
    inputs = [(chunk, valid, rng) for chunk in chunks]
    timing, _ = _time_loop(fwd.driver, run_params, inputs, advance=False, repeats=repeats)
    select = jax.jit(lambda x, p=setting.policy: forward.mask_clips(x, p, spec, rng=rng)[2])
    overhead_s = sum(_median_time(select, chunk, repeats=repeats) for chunk in chunks)
    flops = forward_flops(spec, timing.counts, merges)
    row = {"setting": setting.name, "tokens_kept": float(timing.counts.mean()),
           "forward_clips_per_s": len(timing.counts) / timing.seconds,
           "forward_tokens_per_s": float(timing.counts.sum()) / timing.seconds,
           "rlt_overhead_ms": 1e3 * overhead_s / batches, "flops": flops,
           "compilations": timing.plans, "forward_compile_s": timing.compile_s,
           "forward_s": timing.seconds,
           "forward_mfu": flops / timing.seconds / peak if peak else None}
    if profile and setting.name in ("none", "rlt stream, sorted"):
      breakdowns[f"{setting.name} forward"] = _profile(
          os.path.join(profile, _slug(setting.name) + "-forward"), fwd.driver, run_params, inputs,
          advance=False)
    if train_steps:
      timed, breakdown = _train_timing(run_model, run_params, chunks, setting, mesh, repeats,
                                       profile)
      train_flops = forward_flops(spec, timed.counts, merges)
      row.update({
          "train_clips_per_s": len(timed.counts) / timed.seconds,
          "train_tokens_per_s": float(timed.counts.sum()) / timed.seconds,
          "train_tokens_kept": float(timed.counts.mean()),
          "train_ideal_speedup": full_flops * len(timed.counts) / batch / train_flops,
          "train_plans": timed.plans, "train_compile_s": timed.compile_s,
          "train_s": timed.seconds,
          # forward + backward ≈ 3 × the forward FLOPs (recomputation not counted)
          "train_mfu": 3 * train_flops / timed.seconds / peak if peak else None})
      if breakdown is not None:
        breakdowns[f"{setting.name} train"] = breakdown
    results.append(row)
    print(f"  {setting.name}: {row['forward_clips_per_s']:.2f} forward clips/s"
          + (f", {row['train_clips_per_s']:.2f} train clips/s" if train_steps else ""),
          file=sys.stderr, flush=True)

  none = results[0]
  for r in results:
    r["forward_speedup"] = r["forward_clips_per_s"] / none["forward_clips_per_s"]
    r["ideal_speedup"] = none["flops"] / r["flops"]
    r["forward_efficiency"] = r["forward_speedup"] / r["ideal_speedup"]
    if train_steps:
      r["train_speedup"] = r["train_clips_per_s"] / none["train_clips_per_s"]
      r["train_efficiency"] = r["train_speedup"] / r["train_ideal_speedup"]
      r["train_tokens_per_s_vs_all"] = r["train_tokens_per_s"] / none["train_tokens_per_s"]
    r["rlt_overhead_pct"] = 100 * r["rlt_overhead_ms"] / (1e3 * r["forward_s"] / batches)
  return {"variant": variant, "batch": batch, "dtype": dtype, "clips": len(clips),
          "source": (f"{frames_path} (drawn with replacement)" if draw else frames_path) or source,
          "threshold": threshold, "device": kind, "scan": scan, "repeats": repeats,
          "kept_fraction": fraction, "kept_min_max": [int(kept.min()), int(kept.max())],
          "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "results": results,
          "device_time_ms": breakdowns}


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _schedule(spec: vit.ModelSpec, r: int) -> tuple[int, ...]:
  return tome.schedule(r, spec.depth, spec.num_tokens)


def _tome_matching(spec: vit.ModelSpec, tokens: float) -> int:
  """The constant ToMe r whose mean tokens per block match RLT's (a matched FLOP budget)."""
  best, gap = 0, float("inf")
  for r in range(0, spec.num_tokens // 2):
    counts = tome.token_counts(spec.num_tokens, _schedule(spec, r))
    g = abs(float(np.mean(counts[:spec.depth])) - tokens)
    if g < gap:
      best, gap = r, g
  return best


def _train_step(model, params, batch_size: int, policy: rlt.Policy,
                token_layout: layout.Layout, mesh) -> tuple[train.TrainStep, dict]:
  """The trainer's own step (the release's recipe: AdamW, layer decay, mixing, erasing, drop
  path 0.1) and a fresh state of it on `mesh`."""
  spec = model.spec
  config = recipes.base("B/16")
  config.batch_size = batch_size
  tx, lr_schedule = optim.make(config, params, depth=spec.depth, total_steps=1000,
                               warmup_steps=10)
  aug = augment.Augment(num_classes=spec.num_classes, **config.augment)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
           "rng": jax.random.PRNGKey(1), "bad_step": jnp.int32(-1)}
  shardings = sharding.tree_shardings(mesh, state)
  state = jax.device_put(jax.tree_util.tree_map(jnp.array, state), shardings)  # a copy: donated
  step = train.TrainStep(model.clone(drop_path=0.1), tx, lr_schedule, aug, policy,
                             token_layout, 1, mesh, shardings)
  return step, state


def _train_batch(mesh, clips) -> dict[str, jax.Array]:
  return sharding.global_batch(mesh, {"frames": np.asarray(clips),
                                      "label": np.zeros(len(clips), np.int32),
                                      "valid": np.ones(len(clips), bool)})


def _train_timing(model, params, chunks, setting: Setting, mesh, repeats: int,
                  profile: str | None) -> tuple[Timing, dict | None]:
  """The project's own train step (AdamW, augmentation, two phases) over the chunks, each at
  `repeats` step indices; shapes chosen as a training run chooses them."""
  spec = model.spec
  step, state = _train_step(model, params, len(chunks[0]), setting.policy, setting.layout, mesh)
  run_rng = jax.random.PRNGKey(1)  # the state's own key is donated with the state
  inputs = [(run_rng, i * repeats + r, _train_batch(mesh, chunk))
            for i, chunk in enumerate(chunks) for r in range(repeats)]
  if setting.policy.kind == "rlt":  # as a run: a fixed set of shapes from its steps' counts
    samples = [step.begin(*args).host_counts() for args in inputs]
    step.use_shapes(layout.choose_shapes(
        samples, setting.layout, num_tokens=spec.num_tokens, groups=step.groups,
        max_shapes=16, width=spec.width, mlp_dim=spec.mlp_dim))
  timing, state = _time_loop(step.driver, state, inputs, advance=True, repeats=1)
  breakdown = None
  if profile and setting.name in ("none", "rlt stream, sorted"):
    breakdown = _profile(os.path.join(profile, _slug(setting.name) + "-train"), step.driver,
                         state, inputs, advance=True)
  return timing, breakdown


def train_step_ops(variant: str, batch: int, dtype: str, frames_path: str | None,
                   threshold: float = 0.1, kind: str = "stream") -> dict:
  """Opcode counts of the compiled train step (phase 2) of the first `batch` clips under RLT:
  how many gathers, scatters, copies and concatenates its forward and backward passes run."""
  spec = vit.ModelSpec.from_variant(variant, num_classes=400)
  model = vit.build(spec, dtype=dtype, attention="auto")
  clips = (load_frames(frames_path, spec) if frames_path
           else synthetic_clips(batch, num_frames=spec.num_frames, size=spec.image_size))
  if len(clips) < batch:
    raise ValueError(f"--frames {frames_path}: {len(clips)} clips, fewer than one batch of "
                     f"{batch}")
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), vit.example_tokens(spec))[
      "params"])
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  step, state = _train_step(model, params, batch, rlt.Policy("rlt", threshold),
                            layout.Layout(kind), mesh)
  pending = step.begin(jax.random.PRNGKey(1), 0, _train_batch(mesh, clips[:batch]))
  plan = step.driver.plan(pending)
  counts = device_time.op_counts(step.driver.compile(plan, state, pending.outputs).as_text())
  return {"variant": variant, "batch": batch, "dtype": dtype, "layout": kind,
          "plan": dataclasses.asdict(plan), "jax": jax.__version__,
          "ops": {k: counts[k] for k in ("gather", "scatter", "copy", "concatenate",
                                         "transpose", "dot", "custom-call", "fusion")}}


def print_table(report: dict) -> None:
  print(f"{report['variant']}, batch {report['batch']}, {report['dtype']}, {report['clips']} "
        f"clips from {report['source']}, tau {report['threshold']}: RLT keeps "
        f"{report['kept_fraction']:.0%} ({report['kept_min_max'][0]}–"
        f"{report['kept_min_max'][1]} per clip), on {report['device']} (jax {report['jax']}, "
        f"{report['date']}); compilation not timed")
  mfu = lambda v: f"{v:.0%}" if v else "-"
  print("forward (inference):")
  print(f"{'setting':24s} {'tokens':>7s} {'clips/s':>9s} {'tokens/s':>10s} {'speedup':>7s} "
        f"{'ideal':>6s} {'eff':>5s} {'RLT ms':>7s} {'RLT %':>6s} {'MFU':>5s} {'shapes':>6s} "
        f"{'compile s':>9s}")
  for r in report["results"]:
    print(f"{r['setting']:24s} {r['tokens_kept']:7.0f} {r['forward_clips_per_s']:9.2f} "
          f"{r['forward_tokens_per_s']:10.0f} {r['forward_speedup']:7.2f} "
          f"{r['ideal_speedup']:6.2f} {r['forward_efficiency']:5.2f} "
          f"{r['rlt_overhead_ms']:7.1f} {r['rlt_overhead_pct']:6.1f} "
          f"{mfu(r['forward_mfu']):>5s} {r['compilations']:6d} {r['forward_compile_s']:9.1f}")
  if "train_clips_per_s" in report["results"][0]:
    print("train step (tokens: kept in the train step, after mixing and erasing; ideal from "
          "those counts):")
    print(f"{'setting':24s} {'tokens':>7s} {'clips/s':>9s} {'tokens/s':>10s} {'vs all':>6s} "
          f"{'speedup':>7s} {'ideal':>6s} {'eff':>5s} {'MFU':>5s} {'shapes':>6s} "
          f"{'compile s':>9s}")
    for r in report["results"]:
      print(f"{r['setting']:24s} {r['train_tokens_kept']:7.0f} {r['train_clips_per_s']:9.2f} "
            f"{r['train_tokens_per_s']:10.0f} {r['train_tokens_per_s_vs_all']:6.2f} "
            f"{r['train_speedup']:7.2f} {r['train_ideal_speedup']:6.2f} "
            f"{r['train_efficiency']:5.2f} {mfu(r['train_mfu']):>5s} {r['train_plans']:6d} "
            f"{r['train_compile_s']:9.1f}")
  for name, result in report.get("device_time_ms", {}).items():
    print(device_time.format_breakdown(name, result))


def compile_seconds(variant: str, *, scan: bool, remat: str = "full") -> float:
  """Seconds to lower and compile a training forward + backward of `variant` on one clip."""
  spec = vit.ModelSpec.from_variant(variant, num_classes=400)
  model = vit.build(spec, dtype="bfloat16", remat=remat, scan=scan, drop_path=0.1)
  tokens = vit.example_tokens(spec)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
  loss = lambda p, t: model.apply({"params": p}, t, train=True,
                                  rngs={"dropout": jax.random.PRNGKey(0)}).sum()
  start = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return time.perf_counter() - start


def layout_ceiling(counts: np.ndarray, spec: vit.ModelSpec, *, batch: int, groups: int = 1,
                   window: int = 16, population: int = 4096, seed: int = 0) -> list[dict]:
  """The efficiency ceiling of each layout from the FLOP count alone (no timing).

  Draws `population` clips from these per-clip kept counts (with replacement), cuts them into
  batches as given or sorted within windows of `window` batches, plans every batch, and
  compares the FLOPs of the planned shapes with those of every clip's own tokens.
  """
  rng = np.random.default_rng(seed)
  drawn = rng.choice(np.asarray(counts), size=population // batch * batch)
  ideal = layout.ideal_flops_ratio(drawn, spec.num_tokens, spec.width, spec.mlp_dim)
  rows = []
  for kind in ("padded", "stream"):
    for sort in (False, True):
      order = drawn.copy()
      if sort:
        span = window * batch
        for i in range(0, len(order), span):
          order[i:i + span] = np.sort(order[i:i + span])
      batches = [order[i:i + batch] for i in range(0, len(order), batch)]
      plans = [layout.plan(b, layout.Layout(kind), num_tokens=spec.num_tokens,
                               groups=groups) for b in batches]
      rows.append(_ceiling_row(kind, sort, plans, ideal, spec))
      if kind == "stream" and sort:  # as training runs: ≤ 16 shapes fixed from 16 batches
        shapes = layout.choose_shapes(
            batches[:16], layout.Layout(kind), num_tokens=spec.num_tokens, groups=groups,
            max_shapes=16, width=spec.width, mlp_dim=spec.mlp_dim)
        rows.append(_ceiling_row(kind, sort, [shapes.fit(b) for b in batches], ideal, spec,
                                 fixed=True))
  return rows


def _ceiling_row(kind: str, sort: bool, plans: list, ideal: float, spec: vit.ModelSpec,
                 fixed: bool = False) -> dict:
  planned = float(np.mean([layout.plan_flops_ratio(p, spec.width, spec.mlp_dim)
                           for p in plans]))
  return {"layout": kind, "sorted": sort, "fixed_shapes": fixed, "flops_ratio": planned,
          "speedup_ceiling": 1 / planned, "ideal_speedup": 1 / ideal,
          "efficiency_ceiling": ideal / planned, "shapes": len(set(plans))}


def real_clips(paths: list[str], *, num_frames: int = 16, size: int = 224, stride: int = 4,
               frames_per_clip: int = 64) -> np.ndarray:
  """Centre-crop clips of real videos: one per `frames_per_clip` source frames of each video."""
  clips = [video.read_test_views(p, clips=lambda n: max(1, n // frames_per_clip), crops=1,
                                 clip_len=num_frames, stride=stride, size=size) for p in paths]
  return np.concatenate(clips)


def _ints(text: str) -> tuple[int, ...]:
  """--tome's comma-separated integers."""
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def _prefixes(only: str) -> tuple[str, ...]:
  """--only's setting-name prefixes: comma-separated, unless the whole text starts a name
  (setting names hold commas: 'rlt stream, sorted')."""
  if any(name.startswith(only) for name in SETTINGS + ("tome", "rlt+tome")):
    return (only,) if only else ()
  return tuple(p.strip() for p in only.split(",") if p.strip())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  model_parser = sub.add_parser("model", help="forward and train-step throughput per policy")
  model_parser.add_argument("--variant", default="B/16", choices=sorted(vit.VARIANTS))
  model_parser.add_argument("--batch", type=int, default=32)
  model_parser.add_argument("--dtype", default="bfloat16", choices=sorted(vit.DTYPES))
  clip_source = model_parser.add_mutually_exclusive_group()
  clip_source.add_argument("--source", default="synthetic",
                           help="'synthetic' or a TFRecord glob (centre views)")
  clip_source.add_argument("--frames", help="a .npy of uint8 clips (N, T, H, W, 3), e.g. real "
                           "video cut by python -m rlt_jax.benchmark clips")
  model_parser.add_argument("--draw", type=int, default=0, help="with --frames: draw this many "
                            "clips with replacement (seed 0), e.g. to fill batches of 32")
  model_parser.add_argument("--threshold", type=float, default=0.1)
  model_parser.add_argument("--batches", type=int, default=4, help="synthetic/TFRecord only")
  model_parser.add_argument("--repeats", type=int, default=3)
  model_parser.add_argument("--no_train", action="store_true", help="forward passes only")
  model_parser.add_argument("--only", default="", help="comma-separated setting-name prefixes "
                            "to run besides 'none' (e.g. 'rlt stream,random')")
  model_parser.add_argument("--tome", type=_ints, default=(-1,), metavar="R,…",
                            help="ToMe r per block, comma-separated (-1: matched to RLT's mean "
                            "budget; 0: off), e.g. --tome=-1,65")
  model_parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke)")
  model_parser.add_argument("--scan", action="store_true", help="the blocks as one nn.scan "
                            "(model.scan)")
  model_parser.add_argument("--profile", metavar="DIR", help="write jax.profiler traces of a "
                            "few steady-state steps here and print where the device time goes")
  model_parser.add_argument("--output", help="also write the results as JSON here")
  clips_parser = sub.add_parser("clips", help="cut real videos into a --frames file")
  clips_parser.add_argument("videos", nargs="+", help="video files (mp4, avi, webm …)")
  clips_parser.add_argument("--output", required=True, help=".npy to write")
  clips_parser.add_argument("--num_frames", type=int, default=16)
  clips_parser.add_argument("--image_size", type=int, default=224)
  clips_parser.add_argument("--stride", type=int, default=4)
  clips_parser.add_argument("--frames_per_clip", type=int, default=64,
                            help="one clip per this many source frames of each video")
  ceiling_parser = sub.add_parser("ceiling", help="each layout's efficiency ceiling (FLOPs)")
  ceiling_parser.add_argument("--frames", required=True, help="a .npy of uint8 clips")
  ceiling_parser.add_argument("--variant", default="B/16", choices=sorted(vit.VARIANTS))
  ceiling_parser.add_argument("--batch", type=int, default=32)
  ceiling_parser.add_argument("--groups", type=int, default=1, help="batch shards (devices)")
  ceiling_parser.add_argument("--window", type=int, default=16, help="batches sorted together")
  ceiling_parser.add_argument("--threshold", type=float, default=0.1)
  ceiling_parser.add_argument("--output", help="also write the results as JSON here")
  ops_parser = sub.add_parser("ops", help="gathers, scatters, copies … of the compiled train "
                              "step")
  ops_parser.add_argument("--variant", default="B/16", choices=sorted(vit.VARIANTS))
  ops_parser.add_argument("--batch", type=int, default=32)
  ops_parser.add_argument("--dtype", default="bfloat16", choices=sorted(vit.DTYPES))
  ops_parser.add_argument("--frames", help="a .npy of uint8 clips (default: synthetic clips)")
  ops_parser.add_argument("--layout", default="stream", choices=layout.KINDS)
  ops_parser.add_argument("--output", help="also write the results as JSON here")
  compile_parser = sub.add_parser("compile", help="compile time, unrolled vs scanned blocks")
  compile_parser.add_argument("--variant", default="L/16", choices=sorted(vit.VARIANTS))
  compile_parser.add_argument("--remat", default="full", choices=sorted(vit.REMAT_POLICIES))
  compile_parser.add_argument("--output", help="also write the results as JSON here")
  data_parser = sub.add_parser("data", help="converter and input pipeline throughput")
  data_parser.add_argument("--videos", type=int, default=8)
  data_parser.add_argument("--seconds", type=float, default=10.0)
  data_parser.add_argument("--output", help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if args.what == "clips":
    for name in ("num_frames", "image_size", "stride", "frames_per_clip"):
      if getattr(args, name) < 1:
        parser.error(f"--{name} {getattr(args, name)}: expected ≥ 1")
    try:
      clips = real_clips(args.videos, num_frames=args.num_frames, size=args.image_size,
                         stride=args.stride, frames_per_clip=args.frames_per_clip)
    except (OSError, video.VideoError) as e:
      raise SystemExit(f"error: {e}") from None
    with files.atomic_write(args.output, "wb") as f:
      np.save(f, clips)
    print(f"wrote {clips.shape} uint8 clips to {args.output}")
    return
  if args.what == "ceiling":
    try:
      spec = vit.ModelSpec.from_variant(args.variant, num_classes=400)
      frames = load_frames(args.frames, dataclasses.replace(
          spec, num_frames=np.load(args.frames, mmap_mode="r").shape[1]))
      spec = dataclasses.replace(spec, num_frames=frames.shape[1])
      counts = rlt.kept_counts(frames, rlt.Policy("rlt", args.threshold),
                               tubelet_size=spec.tubelet_size, patch_size=spec.patch_size)
      result = {"variant": args.variant, "batch": args.batch, "groups": args.groups,
                "window": args.window, "clips": len(counts),
                "kept_fraction": float(counts.mean() / spec.num_tokens),
                "rows": layout_ceiling(counts, spec, batch=args.batch, groups=args.groups,
                                       window=args.window)}
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    print(f"{args.variant}, batch {args.batch} in {args.groups} group(s), {len(counts)} clips "
          f"keeping {result['kept_fraction']:.1%} of {spec.num_tokens} tokens (τ "
          f"{args.threshold}); ideal speedup {result['rows'][0]['ideal_speedup']:.2f}")
    print(f"{'layout':8s} {'order':38s} {'speedup ceiling':>15s} {'efficiency':>10s} "
          f"{'shapes':>6s}")
    for r in result["rows"]:
      order = f"sorted (window {args.window})" if r["sorted"] else "as drawn"
      order += ", ≤ 16 fixed shapes" if r["fixed_shapes"] else ""
      print(f"{r['layout']:8s} {order:38s} {r['speedup_ceiling']:15.2f} "
            f"{r['efficiency_ceiling']:10.2f} {r['shapes']:6d}")
  elif args.what == "model":
    for name in ("batch", "batches", "repeats"):
      if getattr(args, name) < 1:
        parser.error(f"--{name} {getattr(args, name)}: expected ≥ 1")
    if args.draw < 0 or (args.draw and not args.frames):
      parser.error(f"--draw {args.draw}: expected a count ≥ 0, with --frames")
    if not (np.isfinite(args.threshold) and args.threshold >= 0):
      parser.error(f"--threshold {args.threshold}: expected a finite number ≥ 0")
    if any(r < -1 for r in args.tome):
      parser.error(f"--tome {','.join(map(str, args.tome))}: expected r ≥ 0 per block, or -1 "
                   "(matched to RLT's budget)")
    try:
      result = model_benchmark(args.variant, args.batch, args.dtype, args.source, args.frames,
                               args.threshold, args.batches, args.repeats, args.tiny,
                               not args.no_train, args.tome, _prefixes(args.only), args.draw,
                               args.profile, args.scan)
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    print_table(result)
  elif args.what == "ops":
    try:
      result = train_step_ops(args.variant, args.batch, args.dtype, args.frames,
                              kind=args.layout)
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    plan = result["plan"]
    print(f"{args.variant} train step, batch {args.batch}, {args.dtype}, {args.layout} layout "
          f"({plan['length']} stream slots × rows of {plan['capacity']}), jax {jax.__version__}: "
          + ", ".join(f"{n} {op}" for op, n in result["ops"].items()))
  elif args.what == "compile":
    result = {"variant": args.variant, "remat": args.remat, "jax": jax.__version__,
              "device": jax.devices()[0].device_kind,
              **{f"{name}_s": compile_seconds(args.variant, scan=scan, remat=args.remat)
                 for name, scan in (("unrolled", False), ("scan", True))}}
    print(f"{args.variant} (remat {args.remat}), training forward + backward on one clip, "
          f"{result['device']}, jax {jax.__version__}: compiled in {result['unrolled_s']:.1f} s "
          f"unrolled, {result['scan_s']:.1f} s with model.scan")
  elif args.what == "data":
    result = data(args.videos, args.seconds)
    for key, value in result.items():
      print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
  if args.output:
    files.write_json(args.output, result)


if __name__ == "__main__":
  main()
