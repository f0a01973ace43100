"""tokens.py: tokens kept per τ for a video, and the picture."""

import numpy as np
from PIL import Image

from rlt_jax import rlt, tokens
from videos import write_video


def test_a_video_reports_its_kept_tokens_and_draws_them(tmp_path, capsys):
  path = tmp_path / "square.mp4"
  write_video(path, frames=70)
  tokens.main(["--video", str(path), "--thresholds", "0.1,100", "--save_png",
               str(tmp_path / "t.png"), "--save_gif", str(tmp_path / "t.gif")])
  out = capsys.readouterr().out
  clips = tokens.video_clips(str(path))
  kept = rlt.keep_mask(rlt.normalize(clips), threshold=0.1).reshape(len(clips), -1).sum(-1)
  assert f"τ = 0.1: {kept.mean():.0f} of 1568 kept" in out
  assert "τ = 100: 196 of 1568 kept" in out  # only the first tubelet survives τ = 100
  png = np.asarray(Image.open(tmp_path / "t.png"))
  assert png.shape == (4 * 224, 2 * 224, 3)
  assert Image.open(tmp_path / "t.gif").n_frames == 16


def test_the_overlay_greys_dropped_patches():
  clip = np.zeros((16, 224, 224, 3), np.uint8)
  clip[8:, :16, :16] = 255  # one patch changes at frame 8
  panels = tokens.overlay(clip, 0.1)
  assert (panels[2][100:110, 100:110] == 96).all()  # dropped: 0.25·0 + 0.75·128
  assert not (panels[0][100:110, 100:110] == 96).any()  # the first tubelet is kept


def test_benchmark_tiny_smoke(capsys):
  from rlt_jax import benchmark
  report = benchmark.model_benchmark(tiny=True)
  assert [(r["policy"], r["batching"]) for r in report["results"]] == [
      ("none", "all tokens"), ("rlt", "fixed capacity"), ("rlt", "bucketed"), ("rlt", "packed"),
      ("random", "bucketed")]
  none, rlt_fixed = report["results"][:2]
  assert none["ideal_speedup"] == 1.0 and rlt_fixed["tokens_kept"] < none["tokens_kept"]
  assert rlt_fixed["ideal_speedup"] > 1.0
  benchmark.print_table(report)
  assert "fwd clips/s" in capsys.readouterr().out
