"""predict.py: converted directories or .pth files, on clip arrays or real video."""

import numpy as np
import pytest

from rlt_jax import convert, predict
from rlt_jax.data import video

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


def test_a_real_video_prints_top5_and_tokens_kept(model_dir, tmp_path, capsys):
  path = tmp_path / "square.mp4"
  video.write_moving_square(path)
  labels = tmp_path / "labels.txt"
  labels.write_text("\n".join(f"class {i}" for i in range(400)))
  predict.main(["--checkpoint", str(model_dir), "--video", str(path), "--views", "2x3",
                "--labels", str(labels)])
  out = capsys.readouterr().out
  assert (f"6 clip(s) of 16 frames of 224×224: 2 clips × 3 crops of {path} (every 4th frame, "
          "short side 224); policy rlt") in out  # which views and geometry
  kept = float(out.split("average (")[1].split("%")[0])
  assert kept < 30  # a static background with one moving square: most tokens are dropped
  assert [line.split(". ")[0].strip() for line in out.splitlines()[2:]] == ["1", "2", "3", "4", "5"]
  assert out.count(" class ") == 5


def test_without_labels_the_classes_are_called_by_their_index(model_dir, tmp_path, capsys):
  path = tmp_path / "square.mp4"
  video.write_moving_square(path)
  predict.main(["--checkpoint", str(model_dir), "--video", str(path), "--views", "1x1"])
  out = capsys.readouterr().out
  assert "class indices: --labels classes.txt gives their names" in out
  assert out.count(". class ") == 5


@pytest.mark.parametrize("output, message", [
    ("missing/logits.npy", "the folder .*missing does not exist"),
    (".", "is a directory"),
])
def test_a_bad_output_path_is_refused_before_inference(model_dir, expected, tmp_path,
                                                       monkeypatch, output, message):
  clips = tmp_path / "clips.npy"
  np.save(clips, expected["frames"])
  monkeypatch.chdir(tmp_path)
  ran = []
  monkeypatch.setattr(predict.Predictor, "__call__", lambda *a: ran.append(1))
  with pytest.raises(SystemExit, match=f"--output {output}: {message}"):
    predict.main(["--checkpoint", str(model_dir), "--frames", str(clips), "--output", output])
  assert not ran


def test_an_unreadable_video_is_named(model_dir, tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(SystemExit, match="broken.mp4"):
    predict.main(["--checkpoint", str(model_dir), "--video", str(bad)])
