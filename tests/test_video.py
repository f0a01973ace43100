"""video.py: decoding real files, resampling, and the release's sampling and test views."""

import numpy as np
import pytest

from rlt_jax import video
from videos import write_video


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_real_files_decode_to_rgb_at_their_rate(tmp_path, suffix):
  path = tmp_path / f"clip{suffix}"
  write_video(path, frames=30, height=120, width=160, rate=25)
  frames, rate = video.decode(str(path))
  assert len(frames) == 30 and rate == 25 and frames[0].shape == (120, 160, 3)
  assert frames[0].dtype == np.uint8
  resampled, rate = video.decode(str(path), fps=10)
  assert rate == 10 and len(resampled) == 12  # 1.2 s at 10 fps
  doubled, _ = video.decode(str(path), fps=50)
  assert len(doubled) == 60


def test_yuv444_sources_decode(tmp_path):
  path = tmp_path / "clip.mp4"
  write_video(path, frames=5, height=64, width=96, pix_fmt="yuv444p")
  frames, _ = video.decode(str(path))
  assert len(frames) == 5 and frames[0].shape == (64, 96, 3)


def test_bad_files_raise_a_named_error(tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(video.VideoError, match="broken.mp4"):
    video.decode(str(bad))


def test_short_clips_repeat_their_last_sampled_frame():
  assert video.clip_indices(10, 0, 6, 4).tolist() == [0, 4, 8, 8, 8, 8]
  assert video.clip_indices(100, 3, 4, 2.5).tolist() == [3, 5, 8, 10]


def test_short_side_resize_keeps_the_aspect_ratio():
  assert video.short_side_shape(240, 320, 224) == (224, 299)
  assert video.short_side_shape(320, 240, 224) == (299, 224)


def test_test_views_follow_the_release_protocol():
  frames = [np.full((240, 320, 3), i, np.uint8) for i in range(90)]
  views = video.test_views(frames, clips=4, crops=3)
  assert views.shape == (12, 16, 224, 224, 3)
  sampled = np.arange(0, 90, 4)  # 23 frames at stride 4 → starts 0, 2, 4, 7 (floored)
  starts = np.linspace(0, len(sampled) - 16, 4).astype(int)
  assert [views[3 * c, 0, 0, 0, 0] for c in range(4)] == sampled[starts].tolist()
  short = video.test_views(frames[:20], clips=2, crops=1)  # 5 frames, padded with the last
  assert short.shape == (2, 16, 224, 224, 3) and short[0, -1, 0, 0, 0] == 16


def test_jpeg_round_trip_is_close():
  frame = np.random.RandomState(0).randint(0, 255, (8, 12, 3), np.uint8)
  frame = video.resize(frame, (64, 96))  # smooth, as video is
  back = video.decode_jpeg(video.encode_jpeg(frame, 95))
  assert back.shape == frame.shape and np.abs(back.astype(int) - frame).mean() < 4
  with pytest.raises(OSError):
    video.decode_jpeg(video.encode_jpeg(frame)[:200])
