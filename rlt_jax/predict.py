"""Runs a model on clips or on a video, in float32 with the highest matmul precision.

    python -m rlt_jax.predict --checkpoint DIR|FILE.pth --frames clips.npy
        [--policy none|rlt|random] [--threshold 0.1] [--output logits.npy]
    python -m rlt_jax.predict --checkpoint DIR|FILE.pth --video FILE.mp4
        [--labels classes.txt] [--views 4x3] [--policy rlt] [--tome R]

`clips.npy` holds uint8 RGB clips (B, T, H, W, 3), normalised here exactly as in training.
A video is decoded with PyAV in one streaming pass that keeps only the frames its views need
(frames in decoder order), sampled as the release tests (every 4th frame, short side → 224,
clips × crops views) and the views' softmax averaged. Clips are grouped by kept-token count
before batching (results come back in the input order), and each batch runs at static shapes
planned from its exact counts: each clip's logits are those of its kept tokens alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from rlt_jax import convert, layout, rlt
from rlt_jax.checkpoints import checkpoint, torch_checkpoint
from rlt_jax.data import input_pipeline, video
from rlt_jax.models import tome, vit
from rlt_jax.runtime import files
from rlt_jax.training import forward


def load(path: str) -> tuple[vit.ModelSpec, dict]:
  """(spec, params) from a converted directory or, converted on the fly, a .pth."""
  if os.path.isdir(path):
    return checkpoint.load_model(path)
  params, config, _ = convert.convert(path)
  return vit.ModelSpec.from_dict(config, path), params


class Predictor:
  """Batched logits for uint8 clips under a token policy (and optionally ToMe)."""

  def __init__(self, spec: vit.ModelSpec, params: dict, *, policy: rlt.Policy = rlt.Policy(),
               batch_size: int = 8, merges: int = 0, seed: int = 0):
    if batch_size < 1:
      raise ValueError(f"--batch_size {batch_size}: expected ≥ 1")
    self.spec, self.params, self.batch_size, self.policy = spec, params, batch_size, policy
    model = vit.build(spec)
    if merges:
      model = model.clone(tome=tome.schedule(merges, spec.depth, spec.num_tokens))
    token_layout = layout.Layout("padded" if merges else "stream")
    self.forward = forward.Forward(model, policy, token_layout)
    self.rng = jax.random.PRNGKey(seed)

  def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, classes) float32, tokens kept per clip (B,)), in the order of `frames`."""
    want = (self.spec.num_frames, self.spec.image_size, self.spec.image_size, 3)
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[1:] != want:
      raise ValueError(f"clips must be uint8 of shape (B, {', '.join(map(str, want))}); got "
                       f"{frames.dtype} {frames.shape}")
    if len(frames) == 0:
      raise ValueError("no clips to run (an empty array)")
    counts = rlt.kept_counts(frames, self.policy, tubelet_size=self.spec.tubelet_size,
                             patch_size=self.spec.patch_size)
    order = input_pipeline.order_by_cost(counts)
    logits = np.zeros((len(frames), self.spec.num_classes), np.float32)
    kept = np.zeros(len(frames), np.int32)
    for start in range(0, len(frames), self.batch_size):
      chosen = order[start:start + self.batch_size]
      self.rng, rng = jax.random.split(self.rng)
      with jax.default_matmul_precision("highest"):
        out, counts, _ = self.forward(self.params, frames[chosen], rng=rng)
      logits[chosen], kept[chosen] = np.asarray(out, np.float32), counts
    return logits, kept


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="converted directory or .pth file")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--frames", help=".npy of uint8 clips (B, T, H, W, 3)")
  source.add_argument("--video", help="a video file (mp4, webm, avi …)")
  parser.add_argument("--policy", choices=rlt.POLICIES, default="rlt")
  parser.add_argument("--threshold", type=float, default=0.1)
  parser.add_argument("--keep_fraction", type=float, default=0.5, help="for --policy random")
  parser.add_argument("--tome", type=int, default=0,
                      help="Token Merging: tokens merged per block (0: off); training-free")
  parser.add_argument("--output", help="write the logits (B, classes) float32 here (.npy)")
  parser.add_argument("--labels", help="class names, one per line")
  parser.add_argument("--views", default="4x3", help="clips x crops for --video")
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args(argv)
  try:
    if args.tome < 0:
      raise ValueError(f"--tome {args.tome}: expected ≥ 0")
    token_policy = rlt.Policy(args.policy, args.threshold, args.keep_fraction)
    views = video.parse_views(args.views)
    for path in (args.checkpoint, args.frames or args.video, args.labels):
      if path and not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if args.output:
      files.check_output(args.output, "--output")
    spec, params = load(args.checkpoint)
    predictor = Predictor(spec, params, policy=token_policy, batch_size=args.batch_size,
                          merges=args.tome)
    if args.frames:
      try:
        clips_ = np.load(args.frames, allow_pickle=False)
      except (OSError, ValueError) as e:
        raise ValueError(f"--frames {args.frames}: not a readable .npy array ({e})") from None
      if not isinstance(clips_, np.ndarray):
        raise ValueError(f"--frames {args.frames}: an .npz archive; expected one .npy array")
    else:
      clips_ = video.read_test_views(args.video, clips=views[0], crops=views[1],
                                     clip_len=spec.num_frames, stride=4, size=spec.image_size)
    try:
      logits, kept = predictor(clips_)
    except ValueError as e:
      raise ValueError(f"{args.frames or args.video}: {e}") from None
    names = None
    if args.labels:
      try:
        with open(args.labels, encoding="utf-8") as f:
          names = [line.strip() for line in f if line.strip()]
      except UnicodeDecodeError as e:
        raise ValueError(f"--labels {args.labels}: not UTF-8 text ({e})") from None
      if len(names) != logits.shape[1]:
        raise ValueError(f"--labels {args.labels}: {len(names)} names for a model with "
                         f"{logits.shape[1]} classes")
  except (ValueError, OSError, video.VideoError, convert.ConversionError,
          torch_checkpoint.UnsafeCheckpointError, OverflowError) as e:
    sys.exit(f"error: {e}")

  if args.output:
    with files.atomic_write(args.output, "wb") as f:
      np.save(f, logits)
  fraction = kept.mean() / spec.num_tokens
  geometry = f"{spec.num_frames} frames of {spec.image_size}×{spec.image_size}"
  source = (f"{views[0]} clips × {views[1]} crops of {args.video} (every 4th frame, short side "
            f"{spec.image_size})" if args.video else f"the clips of {args.frames}")
  print(f"{len(logits)} clip(s) of {geometry}: {source}; policy {args.policy}: "
        f"{kept.mean():.0f} of {spec.num_tokens} tokens kept on average ({fraction:.1%})")
  if args.video:
    probs = jax.nn.softmax(logits, axis=-1).mean(0)
    print("top-5 (softmax averaged over the views)"
          + ("" if names else "; class indices: --labels classes.txt gives their names"))
    for rank, c in enumerate(np.argsort(-probs)[:5], 1):
      print(f"  {rank}. {names[c] if names else f'class {c}'}  {probs[c]:.3f}")
  elif args.output:
    print(f"wrote logits {logits.shape} to {args.output}")


if __name__ == "__main__":
  main()
