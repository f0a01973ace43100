"""Throughput measurements. Speed targets live here, never in timed tests.

    python -m rlt_jax.benchmark model [--variant B/16] [--batch 32] [--dtype bfloat16]
        [--source synthetic|DATA_GLOB] [--threshold 0.1] [--tiny] [--output results.json]
    python -m rlt_jax.benchmark data [--videos 8] [--seconds 10]

`model`: forward (inference) and full train-step (forward, backward, AdamW) throughput for
policies none, rlt and random (at RLT's mean token count), with batching at a fixed capacity
(the bucket that holds every clip of the run), bucketed capacity (per batch, from host kept
counts) and packed rows. Per configuration: clips/s, tokens kept, speedup over `none`, the
ideal speedup from the FLOPs of the kept tokens (linear and attention terms), efficiency =
achieved / ideal, RLT's own overhead (mask + compaction, ms and % of the forward pass),
compilations, and MFU against the device's peak where known. Warm-up excluded, device
synchronised, medians over repeats. `--tiny` runs a small model on small clips (CPU, < 1 min)
and asserts nothing about speed.

`data`: the TFRecord converter (videos/s) and the training input pipeline (16 × 224² clips at
stride 4 from 256-short-side JPEG frames, random resized crop + flip) on generated H.264
videos (480 × 360, 25 fps, a moving square over a textured background). Rates are per CPU
core: work done divided by the CPU seconds of this process and its workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlt_jax import build_tfrecords, input_pipeline, rlt, synthetic, video
from rlt_jax.models import vit

# Dense bf16 peak FLOP/s by device kind (vendor figures), for MFU.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def _cpu_seconds() -> float:
  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                   resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_test_video(path: str, *, frames: int, height: int = 360, width: int = 480,
                     rate: int = 25, seed: int = 0) -> None:
  """H.264 mp4: a textured background with a square moving across it."""
  import av
  rng = np.random.default_rng(seed)
  background = video.resize(rng.integers(0, 256, (height // 8, width // 8, 3), np.uint8),
                            (height, width))
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
      image = background.copy()
      x = 4 * i % (width - 48)
      image[height // 3:height // 3 + 48, x:x + 48] = (255, 40, 40)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def data(num_videos: int = 8, seconds: float = 10.0, batches: int = 20) -> dict:
  """Converter videos/s and pipeline clips/s, each per CPU core."""
  with tempfile.TemporaryDirectory() as tmp:
    videos = []
    for i in range(num_videos):
      videos.append(os.path.join(tmp, f"v{i}.mp4"))
      write_test_video(videos[-1], frames=int(25 * seconds), seed=i)
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


def forward_flops(model: vit.VisionTransformer, tokens: np.ndarray) -> float:
  """FLOPs of the forward pass of clips with these token counts (each clip alone, no padding):
  patch embedding, qkv/proj/MLP matmuls (linear in n) and the two attention matmuls (n²)."""
  n = np.asarray(tokens, np.float64)
  d, m = model.width, model.mlp_dim
  embed = 2 * n * model.tubelet_size * model.patch_size ** 2 * 3 * d
  linear = 2 * n * (4 * d * d + 2 * d * m) * model.depth
  attention = 2 * 2 * n * n * d * model.depth
  return float(np.sum(embed + linear + attention))


def _clips(model: vit.VisionTransformer, source: str, count: int, seed: int = 0) -> np.ndarray:
  """uint8 clips at the model's shape: synthetic motion clips or eval views of TFRecords."""
  if source == "synthetic":
    rng = np.random.default_rng(seed)
    return np.stack([np.stack(synthetic.make_video(i % len(synthetic.CLASSES), rng,
                                                   size=model.image_size,
                                                   num_frames=model.num_frames))
                     for i in range(count)])
  sampling = input_pipeline.Sampling(num_frames=model.num_frames, image_size=model.image_size,
                                     tubelet_size=model.tubelet_size,
                                     patch_size=model.patch_size)
  clips = []
  for batch in input_pipeline.make_dataset(source, mode="val", sampling=sampling, batch_size=1):
    clips.append(batch["frames"][0])
    if len(clips) == count:
      break
  return np.stack(clips)


def _median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def model_benchmark(variant: str = "B/16", batch: int = 32, dtype: str = "bfloat16",
                    source: str = "synthetic", threshold: float = 0.1, batches: int = 4,
                    repeats: int = 5, tiny: bool = False) -> dict:
  """clips/s, tokens, speedups, efficiency, overhead and MFU for every policy × batching."""
  overrides = dict(dtype=dtype, attention="auto")
  if tiny:
    variant, overrides = "tiny", dict(dtype="float32", attention="xla", image_size=64,
                                      num_frames=8, patch_size=16)
    batch, batches, repeats = 4, 2, 2
  base = vit.build(variant, num_classes=400, **overrides)
  frames = _clips(base, source, batch * batches).reshape(
      batches, batch, base.num_frames, base.image_size, base.image_size, 3)
  n = base.num_tokens
  mask = rlt.keep_mask(rlt.normalize(frames.reshape(-1, *frames.shape[2:])),
                       threshold=threshold, tubelet_size=base.tubelet_size,
                       patch_size=base.patch_size)
  kept = mask.reshape(batches, batch, -1).sum(-1)
  buckets = rlt.capacity_buckets(n)
  fraction = float(kept.mean()) / n
  rng = jax.random.PRNGKey(0)
  params = jax.jit(base.init)({"params": rng, "tokens": rng}, frames[0, :1])["params"]
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  labels = jnp.zeros((batch,), jnp.int32)

  def tokenizers():
    yield "none", "all tokens", rlt.TokenizerConfig(), lambda b: n, [n] * batch
    fixed = rlt.choose_capacity(kept.ravel(), buckets)
    yield "rlt", "fixed capacity", rlt.TokenizerConfig(
        policy="rlt", threshold=threshold, capacity=fixed), lambda b: fixed, None
    yield "rlt", "bucketed", rlt.TokenizerConfig(policy="rlt", threshold=threshold), \
        lambda b: rlt.choose_capacity(kept[b], buckets), None
    rows = max(rlt.pack_rows_needed(kept[b], n) for b in range(batches))
    yield "rlt", "packed", rlt.TokenizerConfig(
        policy="rlt", threshold=threshold, packing=True, row_length=n, num_rows=rows), \
        lambda b: None, None
    count = rlt.random_keep_count(n, fraction)
    yield "random", "bucketed", rlt.TokenizerConfig(policy="random", keep_fraction=fraction), \
        lambda b: rlt.choose_capacity([count], buckets), [count] * batch

  results = []
  for policy, batching, tokenizer, capacity_of, tokens in tokenizers():
    def forward(params, x, capacity, tokenizer=tokenizer):
      t = tokenizer if capacity is None else dataclasses.replace(tokenizer, capacity=capacity)
      return base.clone(tokenizer=t).apply({"params": params}, x, rngs={"tokens": rng}).logits

    def train_step(params, opt_state, x, capacity, tokenizer=tokenizer):
      t = tokenizer if capacity is None else dataclasses.replace(tokenizer, capacity=capacity)
      def loss(p):
        logits = base.clone(tokenizer=t).apply({"params": p}, x, train=True,
                                                rngs={"tokens": rng, "dropout": rng}).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    def overhead(x, capacity, tokenizer=tokenizer):
      t = tokenizer if capacity is None else dataclasses.replace(tokenizer, capacity=capacity)
      selection = rlt.select_tokens(rlt.normalize(x), t, tubelet_size=base.tubelet_size,
                                    patch_size=base.patch_size, rng=rng)
      return rlt.compact(selection, t).patches

    fwd = jax.jit(forward, static_argnums=2)
    step = jax.jit(train_step, static_argnums=3)
    select = jax.jit(overhead, static_argnums=1)
    forward_s = train_s = overhead_s = 0.0
    for b in range(batches):
      x = jnp.asarray(frames[b])
      capacity = capacity_of(b)
      forward_s += _median_time(fwd, params, x, capacity, repeats=repeats)
      train_s += _median_time(step, params, opt_state, x, capacity, repeats=repeats)
      overhead_s += _median_time(select, x, capacity, repeats=repeats)
    clip_tokens = np.asarray(tokens * batches if tokens else kept.ravel())
    results.append({
        "policy": policy, "batching": batching, "tokens_kept": float(clip_tokens.mean()),
        "forward_clips_per_s": batch * batches / forward_s,
        "train_clips_per_s": batch * batches / train_s,
        "rlt_overhead_ms": 1e3 * overhead_s / batches,
        "flops": forward_flops(base, clip_tokens),
        "compilations": fwd._cache_size(),
        "forward_s": forward_s, "train_s": train_s})

  none = results[0]
  kind = jax.devices()[0].device_kind
  peak = PEAK_FLOPS.get(kind) if dtype == "bfloat16" else None
  for r in results:
    r["forward_speedup"] = r["forward_clips_per_s"] / none["forward_clips_per_s"]
    r["train_speedup"] = r["train_clips_per_s"] / none["train_clips_per_s"]
    r["ideal_speedup"] = none["flops"] / r["flops"]
    r["forward_efficiency"] = r["forward_speedup"] / r["ideal_speedup"]
    r["train_efficiency"] = r["train_speedup"] / r["ideal_speedup"]
    r["rlt_overhead_pct"] = 100 * r["rlt_overhead_ms"] / (1e3 * none["forward_s"] / batches)
    r["forward_mfu"] = r["flops"] / r["forward_s"] / peak if peak else None
  return {"variant": variant, "batch": batch, "dtype": dtype if not tiny else "float32",
          "source": source, "threshold": threshold, "device": kind,
          "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}


def print_table(report: dict) -> None:
  print(f"{report['variant']}, batch {report['batch']}, {report['dtype']}, {report['source']} "
        f"clips, tau {report['threshold']}, on {report['device']} (jax {report['jax']}, "
        f"{report['date']})")
  header = (f"{'policy':8s} {'batching':15s} {'tokens':>7s} {'fwd clips/s':>11s} {'speedup':>7s} "
            f"{'ideal':>6s} {'eff':>5s} {'train clips/s':>13s} {'speedup':>7s} {'eff':>5s} "
            f"{'RLT ms':>7s} {'RLT %':>6s} {'MFU':>5s} {'compiles':>8s}")
  print(header)
  for r in report["results"]:
    mfu = f"{r['forward_mfu']:.0%}" if r["forward_mfu"] else "-"
    print(f"{r['policy']:8s} {r['batching']:15s} {r['tokens_kept']:7.0f} "
          f"{r['forward_clips_per_s']:11.1f} {r['forward_speedup']:7.2f} "
          f"{r['ideal_speedup']:6.2f} {r['forward_efficiency']:5.2f} "
          f"{r['train_clips_per_s']:13.1f} {r['train_speedup']:7.2f} "
          f"{r['train_efficiency']:5.2f} {r['rlt_overhead_ms']:7.2f} "
          f"{r['rlt_overhead_pct']:6.1f} {mfu:>5s} {r['compilations']:8d}")


def _write_json(path: str, value: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  model_parser = sub.add_parser("model", help="forward and train-step throughput per policy")
  model_parser.add_argument("--variant", default="B/16", choices=sorted(vit.VARIANTS))
  model_parser.add_argument("--batch", type=int, default=32)
  model_parser.add_argument("--dtype", default="bfloat16", choices=sorted(vit.DTYPES))
  model_parser.add_argument("--source", default="synthetic",
                            help="'synthetic' or a TFRecord glob (eval views)")
  model_parser.add_argument("--threshold", type=float, default=0.1)
  model_parser.add_argument("--batches", type=int, default=4)
  model_parser.add_argument("--repeats", type=int, default=5)
  model_parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke)")
  model_parser.add_argument("--output", help="also write the results as JSON here")
  data_parser = sub.add_parser("data", help="converter and input pipeline throughput")
  data_parser.add_argument("--videos", type=int, default=8)
  data_parser.add_argument("--seconds", type=float, default=10.0)
  data_parser.add_argument("--output", help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if args.what == "model":
    result = model_benchmark(args.variant, args.batch, args.dtype, args.source, args.threshold,
                             args.batches, args.repeats, args.tiny)
    print_table(result)
  else:
    result = data(args.videos, args.seconds)
    for key, value in result.items():
      print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
  if args.output:
    _write_json(args.output, result)


if __name__ == "__main__":
  main()
