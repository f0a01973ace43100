"""benchmark.py: the tool runs end to end and counts FLOPs as it says (no timing asserted)."""

import numpy as np
import pytest

from rlt_jax import benchmark, rlt
from rlt_jax.data import video
from rlt_jax.models import vit
from rlt_jax.training import two_phase


def test_the_tiny_model_benchmark_runs_every_layout_and_the_real_train_step(capsys, tmp_path):
  report = benchmark.model_benchmark(tiny=True, only=("rlt stream",), profile=str(tmp_path))
  names = [r["setting"] for r in report["results"]]
  assert names == ["none", "rlt stream, unsorted", "rlt stream, sorted"]
  none, unsorted, grouped = report["results"]
  assert none["ideal_speedup"] == 1.0 and none["forward_efficiency"] == 1.0
  assert grouped["tokens_kept"] < none["tokens_kept"] and grouped["ideal_speedup"] > 1.0
  spec = vit.ModelSpec.from_variant("tiny", num_classes=400, image_size=64, num_frames=8)
  for r in report["results"]:
    assert r["train_clips_per_s"] > 0 and r["compilations"] >= 1 and r["train_plans"] >= 1
    assert r["forward_compile_s"] > 0 and r["train_compile_s"] > 0  # reported apart
    # tokens/s are the kept tokens the timed steps ran, per second
    assert r["forward_tokens_per_s"] == pytest.approx(r["forward_clips_per_s"]
                                                      * r["tokens_kept"])
    assert r["train_tokens_per_s"] == pytest.approx(r["train_clips_per_s"]
                                                    * r["train_tokens_kept"])
    # the train ideal comes from the train step's own counts, not the forward pass's
    assert r["train_efficiency"] == pytest.approx(r["train_speedup"] / r["train_ideal_speedup"])
  assert none["train_tokens_kept"] == spec.num_tokens and none["train_ideal_speedup"] == 1.0
  assert grouped["train_ideal_speedup"] > 1.0
  breakdowns = report["device_time_ms"]
  assert set(breakdowns) == {"none forward", "none train", "rlt stream, sorted forward",
                             "rlt stream, sorted train"}
  train = breakdowns["rlt stream, sorted train"]
  assert train["matmuls"] > 0 and train["optimizer"] > 0 and train["phase 1"] > 0
  assert list(tmp_path.glob("rlt_stream__sorted-train/**/*.trace.json.gz"))
  benchmark.print_table(report)
  out = capsys.readouterr().out
  assert "forward (inference)" in out and "train step" in out and "idle" in out


def test_no_timed_loop_contains_a_compilation(monkeypatch):
  """Every plan a loop needs is compiled before the clock starts."""
  timing = {"on": False}
  compile, run_loop = two_phase.TwoPhase.compile, benchmark._run_loop

  def watched_compile(self, plan, *args):
    assert not (timing["on"] and plan not in self.executables), f"compiled {plan} while timed"
    return compile(self, plan, *args)

  def timed_loop(*args, **kwargs):
    timing["on"] = True
    try:
      return run_loop(*args, **kwargs)
    finally:
      timing["on"] = False

  monkeypatch.setattr(two_phase.TwoPhase, "compile", watched_compile)
  monkeypatch.setattr(benchmark, "_run_loop", timed_loop)
  benchmark.model_benchmark(tiny=True, only=("rlt stream, unsorted",))


def test_tome_runs_at_each_r_asked_for_alone_and_after_rlt(capsys):
  """`--tome=-1,3`: the budget matched to RLT's and a fixed r (as the release's r = 65), each
  once. The tiny model has one block, so no merge saves anything before it: matched r = 0, which
  means no ToMe row at all."""
  benchmark.main(["model", "--tiny", "--no_train", "--only", "tome,rlt+tome", "--tome=-1,3,3"])
  out = capsys.readouterr().out
  assert "tome r=3" in out and "rlt+tome r=3" in out and out.count("rlt+tome r=") == 1
  assert "r=0" not in out
  with pytest.raises(SystemExit):
    benchmark.main(["model", "--tiny", "--tome", "-2"])
  assert "--tome -2: expected r ≥ 0 per block, or -1" in capsys.readouterr().err


def test_synthetic_clips_spread_their_kept_tokens_like_real_video():
  clips = benchmark.synthetic_clips(12, num_frames=16, size=224)
  kept = rlt.kept_counts(clips, rlt.Policy("rlt"), tubelet_size=2, patch_size=16) / 1568
  assert kept.min() < 0.2 and kept.max() > 0.9  # static shots … busy scenes


def test_flops_count_each_clip_alone_and_tome_per_block():
  spec = vit.ModelSpec.from_variant("B/16", num_classes=400)
  full = benchmark.forward_flops(spec, [1568])
  assert benchmark.forward_flops(spec, [784, 784]) < full * 2 * 0.5 + 1  # n² attention term
  assert benchmark.forward_flops(spec, [1568], merges=(100,) * 12) < full


def test_the_ceiling_is_highest_for_sorted_streams():
  spec = vit.ModelSpec.from_variant("S/16", num_classes=400)
  counts = np.array([300, 400, 700, 900, 1500, 1560] * 4)
  rows = {(r["layout"], r["sorted"]): r for r in
          benchmark.layout_ceiling(counts, spec, batch=4, window=4, population=256)}
  assert rows[("stream", True)]["efficiency_ceiling"] > rows[("padded", False)][
      "efficiency_ceiling"]
  assert all(0 < r["efficiency_ceiling"] <= 1 for r in rows.values())


def test_frames_of_the_wrong_shape_are_named(tmp_path):
  path = tmp_path / "clips.npy"
  np.save(path, np.zeros((2, 8, 32, 32, 3), np.uint8))
  spec = vit.ModelSpec.from_variant("tiny", num_classes=4, num_frames=8, image_size=64)
  with pytest.raises(ValueError, match=r"clips.npy: expected uint8 clips \(N, 8, 64, 64, 3\)"):
    benchmark.load_frames(str(path), spec)


def test_a_few_real_clips_can_fill_several_batches_by_drawing(tmp_path):
  path = tmp_path / "clips.npy"
  np.save(path, np.random.default_rng(0).integers(0, 255, (3, 8, 64, 64, 3), np.uint8))
  report = benchmark.model_benchmark(tiny=True, frames_path=str(path), draw=8, only=("rlt stream",),
                                     train_steps=False)
  assert report["clips"] == 8 and "drawn with replacement" in report["source"]
  with pytest.raises(ValueError, match="2 clips drawn, fewer than one batch of 4"):
    benchmark.model_benchmark(tiny=True, frames_path=str(path), draw=2, train_steps=False)


def test_compile_time_is_measured_for_unrolled_and_scanned_blocks():
  assert benchmark.compile_seconds("tiny", scan=False) > 0
  assert benchmark.compile_seconds("tiny", scan=True, remat="none") > 0


def test_the_train_step_ops_show_no_scatter_but_the_token_placement():
  report = benchmark.train_step_ops("tiny", 4, "float32", None)
  assert report["plan"]["kind"] == "stream" and report["ops"]["gather"] > 0
  assert report["ops"]["scatter"] <= 1  # layout.tokenize's integer slot placement only


def test_clips_cuts_real_videos_with_the_tokens_tools_geometry_flags(tmp_path, capsys):
  video.write_moving_square(tmp_path / "v.mp4", frames=70)
  out = tmp_path / "clips.npy"
  benchmark.main(["clips", str(tmp_path / "v.mp4"), "--output", str(out), "--image_size", "64",
                  "--num_frames", "8", "--stride", "2", "--frames_per_clip", "32"])
  assert np.load(out).shape == (2, 8, 64, 64, 3)  # one clip per 32 of the 70 frames
  assert "wrote (2, 8, 64, 64, 3) uint8 clips" in capsys.readouterr().out
