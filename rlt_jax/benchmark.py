"""Throughput measurements. Speed targets live here, never in timed tests.

    python -m rlt_jax.benchmark data [--videos 8] [--seconds 10]

`data`: the TFRecord converter (videos/s) and the training input pipeline (16 × 224² clips at
stride 4 from 256-short-side JPEG frames, random resized crop + flip) on generated H.264
videos (480 × 360, 25 fps, a moving square over a textured background). Rates are per CPU
core: work done divided by the CPU seconds of this process and its workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np

from rlt_jax import build_tfrecords, input_pipeline, video


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


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  data_parser = sub.add_parser("data", help="converter and input pipeline throughput")
  data_parser.add_argument("--videos", type=int, default=8)
  data_parser.add_argument("--seconds", type=float, default=10.0)
  data_parser.add_argument("--output", help="also write the results as JSON here")
  args = parser.parse_args(argv)
  result = data(args.videos, args.seconds)
  for key, value in result.items():
    print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
  if args.output:
    with open(args.output + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
  main()
