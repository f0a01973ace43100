"""video.py: decoding real files, resampling, and the release's sampling and test views."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rlt_jax.data import video


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_real_files_decode_to_rgb_at_their_rate(tmp_path, suffix):
  path = tmp_path / f"clip{suffix}"
  video.write_moving_square(path, frames=30, height=120, width=160, rate=25)
  frames, rate = video.decode(str(path))
  assert len(frames) == 30 and rate == 25 and frames[0].shape == (120, 160, 3)
  assert frames[0].dtype == np.uint8
  resampled, rate = video.decode(str(path), fps=10)
  assert rate == 10 and len(resampled) == 12  # 1.2 s at 10 fps
  doubled, _ = video.decode(str(path), fps=50)
  assert len(doubled) == 60


def test_yuv444_sources_decode(tmp_path):
  path = tmp_path / "clip.mp4"
  video.write_moving_square(path, frames=5, height=64, width=96, pix_fmt="yuv444p")
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


VIEWS = [dict(clips=4, crops=3, clip_len=16, stride=4, size=224),  # predict's default
         dict(clips=3, crops=1, clip_len=8, stride=2, size=64),
         dict(clips=2, crops=3, clip_len=4, stride=2, size=32, fps=10),  # fewer frames
         dict(clips=2, crops=2, clip_len=16, stride=4, size=96, fps=50)]  # repeated frames


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
@pytest.mark.parametrize("views", VIEWS, ids=lambda v: "-".join(map(str, v.values())))
def test_streaming_views_equal_the_full_decode(tmp_path, suffix, views):
  path = str(tmp_path / f"clip{suffix}")
  video.write_moving_square(path, frames=70, height=120, width=160)
  fps = views.get("fps")
  expected = video.test_views(video.decode(path, fps=fps)[0],
                              **{k: v for k, v in views.items() if k != "fps"})
  np.testing.assert_array_equal(video.read_test_views(path, **views), expected)


def test_clips_may_be_a_function_of_the_frame_count(tmp_path):
  path = str(tmp_path / "clip.mp4")
  video.write_moving_square(path, frames=70, height=64, width=80)
  views = video.read_test_views(path, clips=lambda n: n // 10, crops=1, clip_len=4, stride=2,
                                size=32)
  assert len(views) == 7


@pytest.mark.parametrize("error", [-5, 9])
def test_a_wrong_frame_count_is_caught_and_the_views_read_again(tmp_path, monkeypatch, error):
  path = str(tmp_path / "clip.mp4")
  video.write_moving_square(path, frames=50, height=64, width=80)
  expected = video.test_views(video.decode(path)[0], clips=3, crops=1, clip_len=8, stride=2,
                              size=32)
  monkeypatch.setattr(video, "count_frames", lambda path, fps: 50 + error)
  passes = []
  decoded = video._decoded
  monkeypatch.setattr(video, "_decoded", lambda *a: passes.append(a) or decoded(*a))
  views = video.read_test_views(path, clips=3, crops=1, clip_len=8, stride=2, size=32)
  np.testing.assert_array_equal(views, expected)
  assert len(passes) == 2


def test_streaming_converts_only_the_frames_the_views_use(tmp_path, monkeypatch):
  path = str(tmp_path / "clip.mp4")
  video.write_moving_square(path, frames=200, height=64, width=80)
  converted = []
  rgb = video._rgb
  monkeypatch.setattr(video, "_rgb", lambda frame, path: converted.append(1) or rgb(frame, path))
  video.read_test_views(path, clips=2, crops=3, clip_len=8, stride=2, size=32)
  assert len(converted) <= 2 * 8 + 1  # the clips' frames, and the first for the shape


def test_streaming_memory_grows_with_the_views_not_the_video(tmp_path):
  """Peak RSS (VmHWM) beyond the imports: a whole decode holds every frame, streaming a few."""
  path = str(tmp_path / "long.avi")
  video.write_moving_square(path, frames=400)  # 400 × 240 × 320 × 3 bytes = 92 MB decoded
  frames_kb = 400 * 240 * 320 * 3 / 1024
  code = textwrap.dedent("""
      import re, sys
      from rlt_jax.data import video
      def peak_kb():
        return int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read())[1])
      before = peak_kb()
      views = dict(clips=2, crops=3, clip_len=8, stride=2, size=64)
      if sys.argv[2] == "stream":
        video.read_test_views(sys.argv[1], **views)
      else:
        video.test_views(video.decode(sys.argv[1])[0], **views)
      print(peak_kb() - before)""")
  growth = {mode: int(subprocess.run([sys.executable, "-c", code, path, mode], check=True,
                                     capture_output=True, text=True).stdout)
            for mode in ("stream", "decode")}
  assert growth["decode"] > frames_kb and growth["stream"] < frames_kb / 2, growth


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_frames_are_counted_without_decoding(tmp_path, suffix):
  path = str(tmp_path / f"clip{suffix}")
  video.write_moving_square(path, frames=33, height=64, width=80)
  for fps in (None, 10, 50):
    assert video.count_frames(path, fps=fps) == len(video.decode(path, fps=fps)[0])


def test_streaming_names_a_bad_file(tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00" * 100)
  for path in (bad, tmp_path / "missing.mp4"):
    with pytest.raises(video.VideoError, match=path.name):
      video.read_test_views(str(path), clips=1, crops=1, clip_len=4, stride=2, size=32)
