"""A small synthetic action dataset, written through the same TFRecord writer as real data.

    python -m rlt_jax.synthetic --output_dir /tmp/rlt_synthetic

Each video is a static, smooth coloured background with one bordered square whose motion is the
class: moving right / left / up / down, growing, shrinking, blinking, or standing still. A
quarter of the videos also pan the camera slowly. Left/right and up/down are classes, so never
flip this dataset. Defaults: 2400 train / 240 val videos of 24 frames at 64² (about 170 MB,
20 s to write). Most patches never change, which is what RLT removes: 37 of the 64 tokens of an
8 × 64² clip with 16² patches are kept on average at τ = 0.1, the first tubelet's 16 included.
What configs/demo.py reaches on it is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from rlt_jax import dmvr, tfrecord, video

CLASSES = ("moving right", "moving left", "moving up", "moving down", "growing", "shrinking",
           "blinking", "standing still")
FRAME_RATE = 15.0


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


def generate(output_dir: str, *, train_videos: int = 2400, val_videos: int = 240,
             size: int = 64, num_frames: int = 24, videos_per_shard: int = 300,
             seed: int = 0) -> None:
  """Writes train/val shards and classes.txt; shards already there are kept (resumable)."""
  os.makedirs(output_dir, exist_ok=True)
  for split, count, split_seed in (("train", train_videos, seed), ("val", val_videos, seed + 1)):
    num_shards = max(1, math.ceil(count / videos_per_shard))
    for shard, ids in enumerate(np.array_split(np.arange(count), num_shards)):
      path = os.path.join(output_dir, f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}")
      if os.path.exists(path) and tfrecord.index_path(path).exists():
        continue
      with tfrecord.ShardWriter(path) as writer:
        for i in ids:
          rng = np.random.default_rng([split_seed, int(i)])
          label = int(i) % len(CLASSES)
          frames = make_video(label, rng, size=size, num_frames=num_frames)
          writer.write(dmvr.serialize(dmvr.VideoRecord(
              [video.encode_jpeg(f, 95) for f in frames], label, CLASSES[label],
              f"{split}_{i:06d}", FRAME_RATE)))
  classes = os.path.join(output_dir, "classes.txt")
  with open(classes + ".tmp", "w") as f:
    f.write("".join(f"{c}\n" for c in CLASSES))
  os.replace(classes + ".tmp", classes)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.synthetic", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--train_videos", type=int, default=2400)
  parser.add_argument("--val_videos", type=int, default=240)
  parser.add_argument("--size", type=int, default=64, help="frame height and width")
  parser.add_argument("--num_frames", type=int, default=24)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  generate(args.output_dir, train_videos=args.train_videos, val_videos=args.val_videos,
           size=args.size, num_frames=args.num_frames, seed=args.seed)
  print(f"wrote {args.train_videos} train and {args.val_videos} val videos of "
        f"{len(CLASSES)} classes to {args.output_dir}")


if __name__ == "__main__":
  main()
