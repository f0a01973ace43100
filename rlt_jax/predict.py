"""Runs a model on clips or on a video, in float32 with the highest matmul precision.

    python -m rlt_jax.predict --checkpoint DIR|FILE.pth --frames clips.npy \
        [--policy none|rlt|random] [--threshold 0.1] [--output logits.npy]
    python -m rlt_jax.predict --checkpoint DIR|FILE.pth --video FILE.mp4 \
        [--labels classes.txt] [--views 4x3] [--policy rlt]

`clips.npy` holds uint8 RGB clips (B, T, H, W, 3), normalised here exactly as in training.
A video is decoded with PyAV (frames in decoder order), sampled as the release tests
(every 4th frame, short side → 224, clips × crops views) and the views' softmax averaged.
With --policy rlt each clip's logits are those of the model run on its kept tokens alone:
the capacity is picked per batch from 128-token buckets (kept counts computed on the host), so
no clip ever overflows and at most one forward per bucket is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import numpy as np

from rlt_jax import checkpoint, convert, rlt, torch_checkpoint, video


def load(path: str) -> tuple[dict, dict]:
  """(model config, params) from a converted directory or, converted on the fly, a .pth."""
  if os.path.isdir(path):
    return checkpoint.load_model(path)
  params, config, _ = convert.convert(path)
  return config, params


class Predictor:
  """Batched logits for uint8 clips under a token policy; one compilation per capacity."""

  def __init__(self, config: dict, params: dict, *, policy: str = "none",
               threshold: float = 0.1, keep_fraction: float = 0.5, batch_size: int = 8,
               seed: int = 0):
    self.config, self.params, self.batch_size = config, params, batch_size
    self.tokenizer = rlt.TokenizerConfig(policy=policy, threshold=threshold,
                                         keep_fraction=keep_fraction)
    self.model = checkpoint.build_model(config, tokenizer=self.tokenizer)
    self.buckets = rlt.capacity_buckets(self.model.num_tokens)
    self.rng = jax.random.PRNGKey(seed)

  @functools.partial(jax.jit, static_argnums=(0, 4))
  def _forward(self, params, frames, rng, capacity):
    tokenizer = dataclasses.replace(self.tokenizer, capacity=capacity)
    return self.model.clone(tokenizer=tokenizer).apply(
        {"params": params}, frames, rngs={"tokens": rng})

  def _capacity(self, frames: np.ndarray) -> int:
    if self.tokenizer.policy == "rlt":
      mask = rlt.keep_mask(rlt.normalize(frames), threshold=self.tokenizer.threshold,
                           tubelet_size=self.model.tubelet_size, patch_size=self.model.patch_size)
      return rlt.choose_capacity(mask.reshape(len(frames), -1).sum(-1), self.buckets)
    if self.tokenizer.policy == "random":
      kept = rlt.random_keep_count(self.model.num_tokens, self.tokenizer.keep_fraction)
      return rlt.choose_capacity([kept], self.buckets)
    return self.model.num_tokens

  def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, classes) float32, tokens kept per clip (B,))."""
    want = (self.model.num_frames, self.model.image_size, self.model.image_size, 3)
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[1:] != want:
      raise ValueError(f"clips must be uint8 of shape (B, {', '.join(map(str, want))}); got "
                       f"{frames.dtype} {frames.shape}")
    logits, kept = [], []
    for start in range(0, len(frames), self.batch_size):
      chunk = frames[start:start + self.batch_size]
      self.rng, rng = jax.random.split(self.rng)
      with jax.default_matmul_precision("highest"):
        out = self._forward(self.params, chunk, rng, self._capacity(chunk))
      rlt.raise_on_overflow(out.num_overflow, self.tokenizer)  # cannot happen: a safeguard
      logits.append(np.asarray(out.logits, np.float32))
      kept.append(np.asarray(out.kept))
    return np.concatenate(logits), np.concatenate(kept)


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
  parser.add_argument("--output", help="write the logits (B, classes) float32 here (.npy)")
  parser.add_argument("--labels", help="class names, one per line")
  parser.add_argument("--views", default="4x3", help="clips x crops for --video")
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args(argv)
  try:
    config, params = load(args.checkpoint)
    predictor = Predictor(config, params, policy=args.policy, threshold=args.threshold,
                          keep_fraction=args.keep_fraction, batch_size=args.batch_size)
    if args.frames:
      clips_ = np.load(args.frames, allow_pickle=False)
    else:
      try:
        num_clips, num_crops = (int(v) for v in args.views.lower().split("x"))
      except ValueError:
        raise ValueError(f"--views {args.views!r}: expected CLIPSxCROPS such as 4x3") from None
      clips_ = video.test_views(video.decode(args.video)[0], clips=num_clips, crops=num_crops,
                          clip_len=predictor.model.num_frames, size=predictor.model.image_size)
    try:
      logits, kept = predictor(clips_)
    except ValueError as e:
      raise ValueError(f"{args.frames or args.video}: {e}") from None
    names = None
    if args.labels:
      with open(args.labels) as f:
        names = [line.strip() for line in f if line.strip()]
      if len(names) != logits.shape[1]:
        raise ValueError(f"--labels {args.labels}: {len(names)} names for a model with "
                         f"{logits.shape[1]} classes")
  except (ValueError, OSError, video.VideoError, convert.ConversionError, torch_checkpoint.UnsafeCheckpointError,
          OverflowError) as e:
    sys.exit(f"error: {e}")

  if args.output:
    tmp = args.output + ".tmp.npy"
    np.save(tmp, logits)
    os.replace(tmp, args.output)
  fraction = kept.mean() / predictor.model.num_tokens
  print(f"{len(logits)} clip(s), policy {args.policy}: {kept.mean():.0f} of "
        f"{predictor.model.num_tokens} tokens kept on average ({fraction:.1%})")
  if args.video:
    probs = jax.nn.softmax(logits, axis=-1).mean(0)
    for rank, c in enumerate(np.argsort(-probs)[:5], 1):
      print(f"  {rank}. {names[c] if names else c}  {probs[c]:.3f}")
  elif args.output:
    print(f"wrote logits {logits.shape} to {args.output}")


if __name__ == "__main__":
  main()
