"""predict.py: converted directories or .pth files, on clip arrays or real video."""

import av
import numpy as np
import pytest

from rlt_jax import convert, predict

TOL = 5e-5


@pytest.fixture(scope="module")
def model_dir(fixtures_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("models") / "tiny"
  convert.main(["--input", str(fixtures_dir / "videomae2_tiny.pth"), "--output", str(out)])
  return out


@pytest.fixture(scope="module")
def expected(fixtures_dir):
  return np.load(fixtures_dir / "videomae2_tiny_expected.npz")


@pytest.mark.parametrize("source", ["dir", "pth"])
@pytest.mark.parametrize("policy,key", [("rlt", "logits_rlt"), ("none", "logits")])
def test_frames_give_the_reference_logits(model_dir, fixtures_dir, expected, tmp_path, capsys,
                                          source, policy, key):
  clips = tmp_path / "clips.npy"
  np.save(clips, expected["frames"])
  checkpoint = model_dir if source == "dir" else fixtures_dir / "videomae2_tiny.pth"
  out = tmp_path / "logits.npy"
  predict.main(["--checkpoint", str(checkpoint), "--frames", str(clips), "--policy", policy,
                "--output", str(out), "--batch_size", "1"])
  logits = np.load(out)
  assert logits.dtype == np.float32 and logits.shape == (2, 400)
  assert np.abs(logits - expected[key]).max() <= TOL
  if policy == "rlt":
    assert "749 of 1568 tokens kept on average (47.8%)" in capsys.readouterr().out


def test_bad_clips_are_named(model_dir, tmp_path):
  clips = tmp_path / "floats.npy"
  np.save(clips, np.zeros((1, 16, 224, 224, 3), np.float32))
  with pytest.raises(SystemExit, match=r"floats.npy: clips must be uint8 of shape \(B, 16, 224"):
    predict.main(["--checkpoint", str(model_dir), "--frames", str(clips)])
  with pytest.raises(SystemExit, match="not a saved rlt_jax model"):
    predict.main(["--checkpoint", str(tmp_path), "--frames", str(clips)])


def write_video(path, frames=90, height=240, width=320):
  """A textured background with a square moving left to right (H.264 mp4)."""
  rng = np.random.RandomState(0)
  background = rng.randint(0, 255, (height, width, 3), np.uint8)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
      image = background.copy()
      image[100:140, 3 * i:3 * i + 40] = 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def test_test_views_follow_the_release_protocol():
  frames = [np.full((240, 320, 3), i, np.uint8) for i in range(90)]
  views = predict.test_views(frames, clips=4, crops=3)
  assert views.shape == (12, 16, 224, 224, 3)
  sampled = np.arange(0, 90, 4)  # 23 frames at stride 4 → starts 0, 2, 4, 7 (floored)
  starts = np.linspace(0, len(sampled) - 16, 4).astype(int)
  assert [views[3 * c, 0, 0, 0, 0] for c in range(4)] == sampled[starts].tolist()
  short = predict.test_views(frames[:20], clips=2, crops=1)  # 5 frames, padded with the last
  assert short.shape == (2, 16, 224, 224, 3) and short[0, -1, 0, 0, 0] == 16


def test_a_real_video_prints_top5_and_tokens_kept(model_dir, tmp_path, capsys):
  video = tmp_path / "square.mp4"
  write_video(video)
  labels = tmp_path / "labels.txt"
  labels.write_text("\n".join(f"class {i}" for i in range(400)))
  predict.main(["--checkpoint", str(model_dir), "--video", str(video), "--views", "2x3",
                "--labels", str(labels)])
  out = capsys.readouterr().out
  assert "6 clip(s), policy rlt" in out
  kept = float(out.split("average (")[1].split("%")[0])
  assert kept < 30  # a static background with one moving square: most tokens are dropped
  assert [line.split(". ")[0].strip() for line in out.splitlines()[1:]] == ["1", "2", "3", "4", "5"]
  assert out.count(" class ") == 5


def test_an_unreadable_video_is_named(model_dir, tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(SystemExit, match="broken.mp4"):
    predict.main(["--checkpoint", str(model_dir), "--video", str(bad)])
