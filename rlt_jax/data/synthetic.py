"""A small synthetic action dataset, written through the same TFRecord writer as real data.

    python -m rlt_jax.data.synthetic [--output_dir DIR]   # default: ~/.cache/rlt_jax/demo

Each video is a static, smooth coloured background with one bordered square whose motion is the
class: moving right / left / up / down, growing, shrinking, blinking, or standing still. A
quarter of the videos also pan the camera slowly. Left/right and up/down are classes, so never
flip this dataset. Defaults: 2400 train / 240 val videos of 24 frames at 64² (about 130 MB).
Most patches never change, which is what RLT removes: 37 of the 64 tokens of an
8 × 64² clip with 16² patches are kept on average at τ = 0.1, the first tubelet's 16 included.
What configs/demo.py reaches on it is in docs/benchmarks.md.

The dataset is written whole into a staging folder and swapped in with a manifest (the
generator's parameters, every file's size and sha256) written last; an existing dataset is
reused only if it matches that manifest, else it is generated again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys

import numpy as np

from rlt_jax.data import dmvr, tfrecord, video
from rlt_jax.runtime import files

CLASSES = ("moving right", "moving left", "moving up", "moving down", "growing", "shrinking",
           "blinking", "standing still")
FRAME_RATE = 15.0
MANIFEST = "synthetic.json"
_VERSION = 1  # of what the generator writes; bump it when make_video or the records change
_OURS = re.compile(r"(train|val)\.tfrecord-\d+-of-\d+|classes\.txt|" + re.escape(MANIFEST) +
                   "|" + re.escape(tfrecord.INDEX_DIR))


def default_dir() -> str:
  """Where the demo keeps the dataset: a per-user cache ($XDG_CACHE_HOME, else ~/.cache), not a
  world-writable folder where anyone could plant shards or links for it to read or follow."""
  cache = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(cache):  # the XDG spec: a relative value is ignored
    cache = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "rlt_jax", "demo")


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A muted, smooth colour field (random 16-pixel cells, bilinearly blended) with fine grain."""
  coarse = rng.integers(60, 200, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
  smooth = video.resize(coarse, (height + 32, width + 32))[16:16 + height, 16:16 + width]
  grain = rng.integers(-4, 5, (height, width, 3))
  return np.clip(smooth.astype(np.int64) + grain, 0, 255).astype(np.uint8)


def _sprite(rng: np.random.Generator, side: int) -> np.ndarray:
  """A saturated square with a dark border, so the object stands out from any background."""
  colour = np.zeros(3, np.uint8)
  colour[rng.permutation(3)[:2]] = (255, int(rng.integers(0, 160)))
  sprite = np.broadcast_to(colour, (side, side, 3)).copy()
  sprite[:2], sprite[-2:], sprite[:, :2], sprite[:, -2:] = 20, 20, 20, 20
  return sprite


def make_video(label: int, rng: np.random.Generator, *, size: int = 64,
               num_frames: int = 24) -> list[np.ndarray]:
  """RGB uint8 frames (size × size) of one clip of class `label`."""
  pan = rng.random() < 0.25
  margin = num_frames if pan else 0
  scene = _texture(rng, size + 2 * margin, size + 2 * margin)
  pan_velocity = rng.choice([-1.0, 1.0], 2) * rng.uniform(0.5, 1.0) if pan else np.zeros(2)
  side = int(rng.integers(16, 23))
  sprite = _sprite(rng, 2 * side)
  speed = rng.uniform(0.6, 0.8) * (size - side) / (num_frames - 1)  # crosses most of the frame
  velocity = {0: (0, speed), 1: (0, -speed), 2: (-speed, 0), 3: (speed, 0)}.get(label, (0, 0))
  travel = np.abs(velocity) * (num_frames - 1)
  low = side / 2 + travel * (np.asarray(velocity) < 0)
  high = size - side / 2 - travel * (np.asarray(velocity) > 0)
  centre = np.array([rng.uniform(lo, max(lo, hi)) for lo, hi in zip(low, high)])
  blink_phase = int(rng.integers(0, 8))
  frames = []
  for t in range(num_frames):
    camera = np.round(margin + pan_velocity * t).astype(int)
    frame = scene[camera[0]:camera[0] + size, camera[1]:camera[1] + size].copy()
    grow = t / (num_frames - 1)
    s = {4: side * (0.6 + 0.9 * grow), 5: side * (1.5 - 0.9 * grow)}.get(label, side)
    s = max(4, int(round(s)))
    visible = label != 6 or (t + blink_phase) // 4 % 2 == 0
    if visible:
      c = centre + np.asarray(velocity) * t
      top, left = int(round(c[0] - s / 2)), int(round(c[1] - s / 2))
      patch = video.resize(sprite, (s, s))
      y0, x0 = max(top, 0), max(left, 0)
      y1, x1 = min(top + s, size), min(left + s, size)
      if y1 > y0 and x1 > x0:
        frame[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    frames.append(frame)
  return frames


def _describe(path: str) -> dict:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _files(root: str) -> list[str]:
  """Every file under root, relative to it, sorted."""
  return sorted(os.path.relpath(os.path.join(folder, name), root)
                for folder, _, names in os.walk(root) for name in names)


def _mismatch(output_dir: str, params: dict) -> str | None:
  """Why the dataset in output_dir is not the one `params` describe, or None if it is."""
  try:
    with open(os.path.join(output_dir, MANIFEST)) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return "no dataset there" if not os.listdir(output_dir) else f"no {MANIFEST} there"
  except (OSError, ValueError) as e:
    return f"unreadable {MANIFEST}: {e}"
  if manifest.get("params") != params:
    return f"it was generated with other parameters ({manifest.get('params')})"
  listed = manifest.get("files", {})
  if (found := [p for p in _files(output_dir) if p != MANIFEST]) != sorted(listed):
    return f"its files are {found}, not the {len(listed)} its manifest lists"
  return next((f"{name} has changed" for name in found
               if _describe(os.path.join(output_dir, name)) != listed[name]), None)


def check_folder(output_dir: str) -> None:
  """Raises FileExistsError unless `output_dir` is missing, empty or a synthetic dataset this
  generator wrote (the only folders `generate` may replace); writes nothing."""
  if not os.path.exists(output_dir):
    return
  if not os.path.isdir(output_dir):
    raise FileExistsError(f"{output_dir}: not a folder; not replacing it: remove it or choose "
                          "another folder")
  names = sorted(os.listdir(output_dir))
  if names and (MANIFEST not in names or not all(map(_OURS.fullmatch, names))):
    raise FileExistsError(
        f"{output_dir}: holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}, not "
        "a synthetic dataset this generator wrote; not replacing it: remove it or choose "
        "another folder")


def generate(output_dir: str, *, train_videos: int = 2400, val_videos: int = 240,
             size: int = 64, num_frames: int = 24, videos_per_shard: int = 300,
             seed: int = 0) -> None:
  """Writes train/val shards and classes.txt, unless output_dir already holds exactly them.

  Only an empty folder or an earlier synthetic dataset (one with a manifest) is replaced:
  a folder holding anything else is an error rather than overwritten.
  """
  params = {"version": _VERSION, "train_videos": train_videos, "val_videos": val_videos,
            "size": size, "num_frames": num_frames, "videos_per_shard": videos_per_shard,
            "seed": seed}
  output_dir = os.path.abspath(output_dir)
  check_folder(output_dir)
  if os.path.exists(output_dir):
    if not (why := _mismatch(output_dir, params)):
      return
  else:
    why = "no dataset there"
  print(f"generating the demo dataset ({train_videos + val_videos} videos) in {output_dir} "
        f"({why}) ...", file=sys.stderr)
  os.makedirs(os.path.dirname(output_dir), exist_ok=True)
  with files.atomic_directory(output_dir) as staging:
    for split, count, split_seed in (("train", train_videos, seed), ("val", val_videos, seed + 1)):
      num_shards = max(1, math.ceil(count / videos_per_shard))
      for shard, ids in enumerate(np.array_split(np.arange(count), num_shards)):
        path = staging / f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}"
        with tfrecord.ShardWriter(path) as writer:
          for i in ids:
            rng = np.random.default_rng([split_seed, int(i)])
            label = int(i) % len(CLASSES)
            frames = make_video(label, rng, size=size, num_frames=num_frames)
            writer.write(dmvr.serialize(dmvr.VideoRecord(
                [video.encode_jpeg(f, 95) for f in frames], label, CLASSES[label],
                f"{split}_{i:06d}", FRAME_RATE)))
    with files.atomic_write(staging / tfrecord.CLASSES_FILE) as f:
      f.write("".join(f"{c}\n" for c in CLASSES))
    manifest = {"params": params,
                "files": {p: _describe(os.path.join(staging, p)) for p in _files(staging)}}
    files.write_json(staging / MANIFEST, manifest)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.data.synthetic", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output_dir", default=default_dir(),
                      help="default: %(default)s")
  parser.add_argument("--train_videos", type=int, default=2400)
  parser.add_argument("--val_videos", type=int, default=240)
  parser.add_argument("--size", type=int, default=64, help="frame height and width")
  parser.add_argument("--num_frames", type=int, default=24)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    generate(args.output_dir, train_videos=args.train_videos, val_videos=args.val_videos,
             size=args.size, num_frames=args.num_frames, seed=args.seed)
  except OSError as e:
    sys.exit(f"error: {e}")
  print(f"{args.output_dir}: {args.train_videos} train and {args.val_videos} val videos of "
        f"{len(CLASSES)} classes")


if __name__ == "__main__":
  main()
