"""Decoding, resizing, JPEG coding and the release's frame sampling and test views.

Shared by the TFRecord converter, the input pipeline and `predict`, so that a video is
sampled and cropped the same way whichever tool reads it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image


class VideoError(ValueError):
  """A video that cannot be decoded or is unusable; the message names the file."""


def _rgb(frame) -> np.ndarray:
  """RGB uint8 of any pixel format, with the stream's display rotation applied."""
  array = frame.to_ndarray(format="rgb24")
  turns = round(getattr(frame, "rotation", 0) or 0) // 90 % 4
  return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def iterate_frames(path: str, *, fps: float | None = None) -> Iterator[tuple[np.ndarray, float]]:
  """(RGB frame, stored frame rate) in decoder order; with `fps`, resampled by timestamp.

  Resampling emits, for every tick k/fps, the latest frame shown at that time, so it works for
  variable frame rates and both lowers and raises the rate.
  """
  import av
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise VideoError(f"{path}: no video stream")
      stream = container.streams.video[0]
      rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
      tick = 0
      for i, frame in enumerate(container.decode(stream)):
        if fps is None:
          yield _rgb(frame), rate
          continue
        time = frame.time if frame.time is not None else i / rate
        if tick / fps > time + 0.5 / rate:
          continue
        image = _rgb(frame)
        while tick / fps <= time + 0.5 / rate:
          yield image, float(fps)
          tick += 1
  except (av.error.FFmpegError, IndexError, OSError) as e:
    raise VideoError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None


def decode(path: str, *, fps: float | None = None) -> tuple[list[np.ndarray], float]:
  """All frames (RGB uint8) and their frame rate; VideoError if there are none."""
  frames, rate = [], 0.0
  for frame, rate in iterate_frames(path, fps=fps):
    frames.append(frame)
  if not frames:
    raise VideoError(f"{path}: the video has no frames")
  return frames, rate


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the short side `size` and the aspect ratio kept (long side rounded)."""
  scale = size / min(height, width)
  return (size, round(width * scale)) if height <= width else (round(height * scale), size)


def resize(frame: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  if frame.shape[:2] == tuple(shape):
    return frame
  return np.asarray(Image.fromarray(frame).resize((shape[1], shape[0]), Image.BILINEAR))


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
  out = io.BytesIO()
  Image.fromarray(frame).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(data))
  image.load()  # raises on truncated data rather than returning grey
  return np.asarray(image.convert("RGB"))


def clip_indices(num_frames: int, start: float, clip_len: int, stride: float) -> np.ndarray:
  """Frame indices of a clip; past the end, its last frame repeats (as the release pads).

  `stride` may be fractional (frames stored at another rate than the one it is given in).
  """
  indices = np.floor(start + stride * np.arange(clip_len)).astype(np.int64)
  return np.minimum(indices, indices[indices < num_frames].max(initial=0))


def test_clip_starts(num_frames: int, *, clips: int, clip_len: int, stride: float) -> list[int]:
  """The release's evenly spaced clip starts over the every-`stride`th-frame sequence."""
  sampled = max(math.ceil(num_frames / stride), clip_len)
  starts = (np.linspace(0, sampled - clip_len, clips) if clips > 1
            else [(sampled - clip_len) // 2])
  return [math.floor(int(s) * stride) for s in starts]


def crop_offsets(long_side: int, size: int, crops: int) -> list[int]:
  """Start, centre, end (for 3) of the long side; the centre for 1."""
  if crops == 1:
    return [(long_side - size) // 2]
  return [int(o) for o in np.linspace(0, long_side - size, crops)]


def crop_long_side(clip: np.ndarray, offset: int, size: int) -> np.ndarray:
  """A size × size crop at `offset` along the long side (clip is (..., H, W, C))."""
  h, w = clip.shape[-3:-1]
  return clip[..., :, offset:offset + size, :] if h <= w else clip[..., offset:offset + size, :, :]


def test_views(frames: list[np.ndarray], *, clips: int = 4, crops: int = 3, clip_len: int = 16,
               stride: int = 4, size: int = 224) -> np.ndarray:
  """The release's test views (clips × crops, T, H, W, C ordered clip-major), uint8.

  Every `stride`-th frame; a short video is padded by repeating its last frame; clip starts
  evenly spaced; short side resized to `size` (PIL bilinear, long side rounded); crops at the
  start, centre and end of the long side.
  """
  shape = short_side_shape(*frames[0].shape[:2], size)
  views = []
  for start in test_clip_starts(len(frames), clips=clips, clip_len=clip_len, stride=stride):
    indices = clip_indices(len(frames), start, clip_len, stride)
    clip = np.stack([resize(frames[i], shape) for i in indices])
    views += [crop_long_side(clip, o, size) for o in crop_offsets(max(shape), size, crops)]
  return np.stack(views)
