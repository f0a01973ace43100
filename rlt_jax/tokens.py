"""How many tokens RLT keeps, and pictures of which.

    python -m rlt_jax.tokens --video FILE.mp4 [--thresholds 0.05,0.1,0.2] [--save_png out.png]
        [--save_gif out.gif]
    python -m rlt_jax.tokens --data '/data/k400/val.tfrecord-*' [--max_clips 1000]
    python -m rlt_jax.tokens --frames clips.npy      # uint8 (B, 16, 224, 224, 3)

A video is cut into consecutive 16-frame clips at stride 4 (short side 224, centre crop); a
dataset gives one centre view per video. For each τ: tokens kept per clip (a row each for a
video), and over all clips the mean, p10, p50, p90 and a histogram of the kept fraction. The
pictures show the first clip at the first τ, one panel per tubelet: dropped tokens greyed out,
kept tokens framed in a colour for their run length (blue: 1 tubelet … red: the whole clip).
"""

from __future__ import annotations

import argparse
import colorsys
import os
import sys

import numpy as np
from PIL import Image

from rlt_jax import input_pipeline, rlt, video

CLIP_LEN, STRIDE, SIZE, TUBELET, PATCH = 16, 4, 224, 2, 16


def video_clips(path: str) -> np.ndarray:
  frames, _ = video.decode(path)
  count = max(1, len(frames) // (CLIP_LEN * STRIDE))
  return video.test_views(frames, clips=count, crops=1, clip_len=CLIP_LEN, stride=STRIDE,
                          size=SIZE)


def data_clips(patterns: str, max_clips: int) -> np.ndarray:
  sampling = input_pipeline.Sampling(num_frames=CLIP_LEN, stride=STRIDE, image_size=SIZE)
  clips = []
  for batch in input_pipeline.make_dataset(patterns, mode="val", sampling=sampling,
                                           batch_size=1):
    if batch["valid"][0]:
      clips.append(batch["frames"][0])
    if len(clips) >= max_clips:
      break
  return np.stack(clips)


def histogram(fractions: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
  counts, edges = np.histogram(fractions, bins=bins, range=(0, 1))
  top = max(int(counts.max()), 1)
  return [f"  {edges[i]:4.0%}–{edges[i + 1]:4.0%} {'#' * round(width * c / top):{width}s} {c}"
          for i, c in enumerate(counts)]


def overlay(clip: np.ndarray, threshold: float) -> list[np.ndarray]:
  """One RGB panel per frame: dropped patches grey, kept ones framed by run-length colour."""
  mask = rlt.keep_mask(rlt.normalize(clip[None]), threshold=threshold, tubelet_size=TUBELET,
                       patch_size=PATCH)[0]
  lengths = rlt.run_lengths(mask[None])[0]
  tubelets = mask.shape[0]
  panels = []
  for t, frame in enumerate(clip):
    j = t // TUBELET
    out = frame.astype(np.float32)
    for y in range(mask.shape[1]):
      for x in range(mask.shape[2]):
        patch = out[y * PATCH:(y + 1) * PATCH, x * PATCH:(x + 1) * PATCH]
        if not mask[j, y, x]:
          patch[:] = 0.25 * patch + 0.75 * 128
          continue
        hue = 0.66 * (1 - (lengths[j, y, x] - 1) / max(tubelets - 1, 1))
        colour = 255 * np.asarray(colorsys.hsv_to_rgb(hue, 1.0, 1.0))
        patch[:2], patch[-2:], patch[:, :2], patch[:, -2:] = colour, colour, colour, colour
    panels.append(out.astype(np.uint8))
  return panels


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.tokens", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--video")
  source.add_argument("--data", help="TFRecord shards (glob)")
  source.add_argument("--frames", help=".npy (or .npz key 'frames') of uint8 clips")
  parser.add_argument("--thresholds", default="0.1", help="comma-separated τ values")
  parser.add_argument("--max_clips", type=int, default=1000)
  parser.add_argument("--save_png")
  parser.add_argument("--save_gif")
  args = parser.parse_args(argv)
  try:
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.frames:
      clips = np.load(args.frames)
      clips = clips["frames"] if isinstance(clips, np.lib.npyio.NpzFile) else clips
      if clips.dtype != np.uint8 or clips.shape[1:] != (CLIP_LEN, SIZE, SIZE, 3):
        raise ValueError(f"{args.frames}: expected uint8 clips (B, {CLIP_LEN}, {SIZE}, {SIZE}, "
                         f"3), got {clips.dtype} {clips.shape}")
    elif args.video:
      clips = video_clips(args.video)
    else:
      clips = data_clips(args.data, args.max_clips)
  except (ValueError, OSError, video.VideoError) as e:
    sys.exit(f"error: {e}")
  total = (CLIP_LEN // TUBELET) * (SIZE // PATCH) ** 2
  print(f"{len(clips)} clip(s) of {CLIP_LEN} × {SIZE}² ({total} tokens each) from "
        f"{args.video or args.data or args.frames}")
  for threshold in thresholds:
    mask = rlt.keep_mask(rlt.normalize(clips), threshold=threshold, tubelet_size=TUBELET,
                         patch_size=PATCH)
    kept = mask.reshape(len(clips), -1).sum(-1)
    p10, p50, p90 = np.percentile(kept, [10, 50, 90])
    print(f"τ = {threshold:g}: {kept.mean():.0f} of {total} kept on average "
          f"({kept.mean() / total:.1%}); p10 {p10:.0f}, p50 {p50:.0f}, p90 {p90:.0f}")
    if args.video:
      print("  per clip: " + " ".join(str(int(k)) for k in kept))
    print("\n".join(histogram(kept / total)))
  panels = overlay(clips[0], thresholds[0])
  if args.save_png:
    grid = np.concatenate([np.concatenate(panels[i:i + 4:TUBELET], 1)
                           for i in range(0, len(panels), 4)], 0)
    tmp = args.save_png + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, args.save_png)
    print(f"wrote {args.save_png}")
  if args.save_gif:
    tmp = args.save_gif + ".tmp.gif"
    images = [Image.fromarray(p) for p in panels]
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=150, loop=0)
    os.replace(tmp, args.save_gif)
    print(f"wrote {args.save_gif}")


if __name__ == "__main__":
  main()
