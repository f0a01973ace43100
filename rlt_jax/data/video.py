"""Decoding, resizing, JPEG coding and the release's frame sampling and test views.

Shared by the TFRecord converter, the input pipeline and `predict`, so that a video is
sampled and cropped the same way whichever tool reads it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import av
import numpy as np
from PIL import Image


class VideoError(ValueError):
  """A video that cannot be decoded or is unusable; the message names the file."""


def _rgb(frame, path: str) -> np.ndarray:
  """RGB uint8 of any pixel format, with the stream's display rotation applied."""
  try:
    array = frame.to_ndarray(format="rgb24")
  except (av.error.FFmpegError, ValueError) as e:
    raise VideoError(f"{path}: cannot convert a frame to RGB ({type(e).__name__}: {e})") from None
  turns = round(getattr(frame, "rotation", 0) or 0) // 90 % 4
  return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def _stored_rate(stream) -> float:
  return float(stream.average_rate or stream.guessed_rate or 0) or 25.0


def _decoded(path: str, fps: float | None) -> Iterator[tuple[Any, int, float]]:
  """(PyAV frame, how many output frames it gives, output rate) in decoder order.

  Without `fps` every frame is given once. With it, every tick k/fps takes the latest frame shown
  at that time, so a frame is given 0, 1 or more times; this works for variable frame rates and
  both lowers and raises the rate. Frames are not converted to RGB here: callers convert only
  the ones they keep.
  """
  try:
    with av.open(path) as container:
      stream, rate = _video_stream(container, path)
      tick = 0
      for i, frame in enumerate(container.decode(stream)):
        if fps is None:
          yield frame, 1, rate
          continue
        time = frame.time if frame.time is not None else i / rate
        first = tick
        while tick / fps <= time + 0.5 / rate:
          tick += 1
        yield frame, tick - first, float(fps)
  except (av.error.FFmpegError, IndexError, OSError) as e:
    raise VideoError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None


def _video_stream(container, path: str):
  """The first video stream of an open container and its stored frame rate."""
  if not container.streams.video:
    raise VideoError(f"{path}: no video stream")
  stream = container.streams.video[0]
  return stream, _stored_rate(stream)


def iterate_frames(path: str, *, fps: float | None = None) -> Iterator[tuple[np.ndarray, float]]:
  """(RGB frame, frame rate) in decoder order: the stored frames, or with `fps` resampled by
  timestamp (each tick k/fps gets the latest frame shown at that time)."""
  for frame, repeats, rate in _decoded(path, fps):
    if repeats:
      image = _rgb(frame, path)
      for _ in range(repeats):
        yield image, rate


def decode(path: str, *, fps: float | None = None) -> tuple[list[np.ndarray], float]:
  """All frames (RGB uint8) and their frame rate; VideoError if there are none."""
  frames, rate = [], 0.0
  for frame, rate in iterate_frames(path, fps=fps):
    frames.append(frame)
  if not frames:
    raise VideoError(f"{path}: the video has no frames")
  return frames, rate


def count_frames(path: str, *, fps: float | None = None) -> int:
  """How many frames `decode` gives, from a demux-only pass (no decoding; milliseconds).

  Packets that hold a frame are counted (not empty ones, not those flagged to be discarded),
  or with `fps` the ticks up to the last timestamp. Headers are not trusted: of seven real
  files, two state a wrong frame count (444 for 68 frames, 456 for 455). This count can still
  be wrong for a file whose decoder drops frames; `read_test_views` checks it.
  """
  try:
    with av.open(path) as container:
      stream, rate = _video_stream(container, path)
      times = [float(p.pts * p.time_base) if p.pts is not None else i / rate
               for i, p in enumerate(p for p in container.demux(stream)
                                     if p.size and not p.is_discard)]
  except (av.error.FFmpegError, IndexError, OSError) as e:
    raise VideoError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
  if fps is None or not times:
    return len(times)
  ticks, last = 0, max(times)
  while ticks / fps <= last + 0.5 / rate:
    ticks += 1
  return ticks


def frame_rate(path: str) -> float:
  """The video's stored frame rate (frames per second; 25 if the file does not say)."""
  try:
    with av.open(path) as container:
      return _video_stream(container, path)[1]
  except (av.error.FFmpegError, OSError) as e:
    raise VideoError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def test_clip_sources(num_frames: int, *, clips: int, clip_len: int,
                      stride: float) -> np.ndarray:
  """(clips, clip_len): the source frame of each position of the test clips, or -1 where
  the clip runs past the video's end (and repeats its last frame)."""
  starts = test_clip_starts(num_frames, clips=clips, clip_len=clip_len, stride=stride)
  raw = np.stack([_positions(start, clip_len, stride) for start in starts])
  return np.where(raw < num_frames, raw, -1)


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
  return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def clip_indices(num_frames: int, start: float, clip_len: int, stride: float) -> np.ndarray:
  """Frame indices of a clip; past the end, its last frame repeats (as the release pads).

  `stride` may be fractional (frames stored at another rate than the one it is given in).
  """
  indices = _positions(start, clip_len, stride)
  return np.minimum(indices, indices[indices < num_frames].max(initial=0))


def _positions(start: float, clip_len: int, stride: float) -> np.ndarray:
  """The frame each position of a clip reads, before the end of the video is considered."""
  return np.floor(start + stride * np.arange(clip_len)).astype(np.int64)


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


def _clip_indices(num_frames: int, *, clips: int, clip_len: int,
                  stride: float) -> list[np.ndarray]:
  """The frame indices of each test clip."""
  return [clip_indices(num_frames, start, clip_len, stride)
          for start in test_clip_starts(num_frames, clips=clips, clip_len=clip_len, stride=stride)]


def _views(frame: Callable[[int], np.ndarray], num_frames: int, long_side: int, *, clips: int,
           crops: int, clip_len: int, stride: float, size: int) -> np.ndarray:
  """Test views from `frame(i)`, frame i already resized to the short side."""
  views = []
  for indices in _clip_indices(num_frames, clips=clips, clip_len=clip_len, stride=stride):
    clip = np.stack([frame(i) for i in indices])
    views += [crop_long_side(clip, o, size) for o in crop_offsets(long_side, size, crops)]
  return np.stack(views)


def test_views(frames: list[np.ndarray], *, clips: int = 4, crops: int = 3, clip_len: int = 16,
               stride: int = 4, size: int = 224) -> np.ndarray:
  """The release's test views (clips × crops, T, H, W, C ordered clip-major), uint8.

  Every `stride`-th frame; a short video is padded by repeating its last frame; clip starts
  evenly spaced; short side resized to `size` (PIL bilinear, long side rounded); crops at the
  start, centre and end of the long side.
  """
  shape = short_side_shape(*frames[0].shape[:2], size)
  return _views(lambda i: resize(frames[i], shape), len(frames), max(shape), clips=clips,
                crops=crops, clip_len=clip_len, stride=stride, size=size)


def read_test_views(path: str, *, clips: int | Callable[[int], int], crops: int, clip_len: int,
                    stride: int, size: int, fps: float | None = None) -> np.ndarray:
  """`test_views(decode(path, fps=fps)[0], ...)`, identical, in one streaming decode.

  Only the frames the views use are kept, resized to the short side as they are decoded, and
  only they are converted to RGB: memory grows with the views, not with the video (4 × 3 views
  of vtest.avi, 795 frames of 768 × 576: 115 MB peak RSS, against 1.13 GB via `decode`).
  Where the clips lie depends on the frame count, so it comes first from a demux-only pass
  (`count_frames`); if decoding then gives another count, the views are read again with the
  true one. `clips` may be a function of the frame count (e.g. one clip per 64 frames).
  """
  num_frames = count_frames(path, fps=fps)
  for _ in range(2):
    num_clips = clips(num_frames) if callable(clips) else clips
    needed = {int(i) for indices in _clip_indices(num_frames, clips=num_clips,
                                                  clip_len=clip_len, stride=stride)
              for i in indices}
    kept, shape, seen = {}, None, 0
    for frame, repeats, _ in _decoded(path, fps):
      hits = [i for i in range(seen, seen + repeats) if i in needed]
      seen += repeats
      if hits or (repeats and shape is None):
        image = _rgb(frame, path)
        shape = shape or short_side_shape(*image.shape[:2], size)  # the first frame's, as above
        kept.update(dict.fromkeys(hits, resize(image, shape)))
    if not seen:
      raise VideoError(f"{path}: the video has no frames")
    if seen == num_frames:
      return _views(kept.__getitem__, num_frames, max(shape), clips=num_clips, crops=crops,
                    clip_len=clip_len, stride=stride, size=size)
    num_frames = seen
  raise VideoError(f"{path}: decoding gave a different number of frames each time")


def parse_views(text: str, name: str = "--views") -> tuple[int, int]:
  """'4x3' → (4 clips, 3 crops); anything else is a ValueError naming `name`."""
  try:
    clips, crops = (int(v) for v in str(text).lower().split("x"))
  except ValueError:
    raise ValueError(f"{name}={text!r}: expected CLIPSxCROPS such as 4x3") from None
  if clips < 1 or crops < 1:
    raise ValueError(f"{name}={text!r}: clips and crops must each be at least 1")
  return clips, crops


CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def write_moving_square(path: str | os.PathLike, *, frames: int = 90, height: int = 240,
                        width: int = 320, rate: int = 25, pix_fmt: str = "yuv420p",
                        texture: int = 1, seed: int = 0) -> None:
  """A small real video file (codec from the suffix, `CODECS`): a still random texture (cells
  of `texture` pixels) with a white 40-pixel square moving right, 3 pixels a frame. For the
  tests and the data benchmark."""
  path = str(path)
  rng = np.random.RandomState(seed)
  cells = rng.randint(0, 255, (-(-height // texture), -(-width // texture), 3), np.uint8)
  background = cells.repeat(texture, 0).repeat(texture, 1)[:height, :width]
  with av.open(path, "w") as container:
    stream = container.add_stream(CODECS[os.path.splitext(path)[1]], rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    for i in range(frames):
      image = background.copy()
      x = 3 * i % max(1, width - 40)
      image[height // 3:height // 3 + 40, x:x + 40] = 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
