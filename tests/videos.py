"""Small real video files for tests, written with PyAV."""

import av
import numpy as np

CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def write_video(path, frames=90, height=240, width=320, rate=25, pix_fmt="yuv420p"):
  """A textured background with a square moving left to right; codec from the suffix."""
  path = str(path)
  rng = np.random.RandomState(0)
  background = rng.randint(0, 255, (height, width, 3), np.uint8)
  with av.open(path, "w") as container:
    stream = container.add_stream(CODECS[path[path.rindex("."):]], rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    for i in range(frames):
      image = background.copy()
      x = 3 * i % max(1, width - 40)
      image[height // 3:height // 3 + 40, x:x + 40] = 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
