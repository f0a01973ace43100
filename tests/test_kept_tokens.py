"""kept_tokens.py: tokens kept per τ for a video, dataset or clips, the pictures, and refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rlt_jax import kept_tokens, rlt
from rlt_jax.data import synthetic, video


def moving_square(frames: int = 8, size: int = 64) -> np.ndarray:
  """One uint8 clip (frames, size, size, 3): noise with a white square moving right."""
  clip = np.repeat(np.random.RandomState(0).randint(0, 255, (1, size, size, 3), np.uint8),
                   frames, 0)
  for t in range(frames):
    clip[t, 20:36, 4 * t:4 * t + 16] = 255
  return clip


def test_a_video_reports_its_kept_tokens_and_draws_them(tmp_path, capsys):
  path = tmp_path / "square.mp4"
  video.write_moving_square(path, frames=70)
  kept_tokens.main(["--video", str(path), "--thresholds", "0.1,100", "--save_png",
               str(tmp_path / "t.png"), "--save_gif", str(tmp_path / "t.gif")])
  out = capsys.readouterr().out
  clips = video.test_views(video.decode(str(path))[0], clips=1, crops=1)  # 70 // 64 clips
  kept = rlt.keep_mask(rlt.normalize(clips), threshold=0.1).reshape(len(clips), -1).sum(-1)
  assert "1 clip(s) of 16 × 224×224 (1568 tokens each)" in out
  assert f"τ = 0.1: {kept.mean():.0f} of 1568 kept" in out
  assert "τ = 100: 196 of 1568 kept" in out  # only the first tubelet survives τ = 100
  mask = kept_tokens.mask_at(clips[:1], 0.1)[0]
  source = kept_tokens.Source(np.arange(4, 68, 4), 25.0)  # the centre clip: frames 4, 8, … 64
  assert source.frames.tolist() == kept_tokens.video_clips(str(path))[1][0].tolist()
  expected, _ = kept_tokens.picture(clips[0], mask, 0.1, "clip 1 of 1 from square.mp4", source)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "t.png")), expected)
  assert Image.open(tmp_path / "t.gif").n_frames == 16


def test_png_has_labels_legend_and_original_frames(fixtures_dir):
  clip = np.load(fixtures_dir / "videomae2_tiny_expected.npz")["frames"][0]
  mask = kept_tokens.mask_at(clip[None], 0.1)[0]
  image, places = kept_tokens.picture(clip, mask, 0.1, "clip 1 of 2 from the fixture")
  overlay = kept_tokens.overlay(clip, mask)
  assert len(places) == 8 and image.shape[1] == 2 * 10 + 4 * 224 + 3 * 8  # 4 tubelets a row
  for j, ((frame_y, frame_x), (tokens_y, tokens_x)) in enumerate(places):
    assert tokens_y > frame_y and tokens_x == frame_x  # the frame above its tokens
    np.testing.assert_array_equal(image[frame_y:frame_y + 224, frame_x:frame_x + 224],
                                  clip[2 * j])
    np.testing.assert_array_equal(image[tokens_y:tokens_y + 224, tokens_x:tokens_x + 224],
                                  overlay[2 * j])
    label = image[frame_y - 30:frame_y, frame_x:frame_x + 224]
    assert (label < 100).all(-1).sum() > 100  # two lines of dark text above each column
  title, legend = image[:places[0][0][0] - 30], image[places[-1][1][0] + 224:]
  assert (title < 100).all(-1).sum() > 500
  for colour in kept_tokens.run_colours(8):  # grey for dropped, then a run of 1 … 8 tubelets
    assert (legend == colour).all(-1).sum() >= 10 * 10  # a swatch
  assert (legend < 100).all(-1).sum() > 1000  # and text beside the swatches


def test_the_picture_counts_tokens_per_tubelet_and_in_all():
  """The numbers in the labels, rendered in the same font, appear where they belong."""
  clip = moving_square()
  mask = kept_tokens.mask_at(clip[None], 0.1)[0]
  assert mask.sum(axis=(1, 2)).tolist() == [16, 4, 6, 4]  # the square's patches change
  heading = kept_tokens._heading(clip, mask, 0.1, "demo", None)
  assert heading[0] == "RLT at tau = 0.1: 30 of 64 tokens kept (46.9%)"
  assert kept_tokens._tubelet_label(mask, 2) == ["tubelet 2: frames 4-5", "6 of 16 kept (38%)"]


def test_small_clips_are_enlarged_so_their_labels_fit():
  clip = moving_square(frames=8, size=64)  # the demo's geometry
  mask = kept_tokens.mask_at(clip[None], 0.1)[0]
  image, places = kept_tokens.picture(clip, mask, 0.1, "demo")
  (frame_y, frame_x), (tokens_y, tokens_x) = places[1]
  big = clip[2].repeat(3, 0).repeat(3, 1)  # 64 → 192 px, nearest
  np.testing.assert_array_equal(image[frame_y:frame_y + 192, frame_x:frame_x + 192], big)
  np.testing.assert_array_equal(image[tokens_y:tokens_y + 192, tokens_x:tokens_x + 192],
                                kept_tokens.overlay(clip, mask)[2].repeat(3, 0).repeat(3, 1))


def test_the_overlay_greys_dropped_patches_and_frames_kept_ones_by_run_length():
  clip = np.zeros((16, 224, 224, 3), np.uint8)
  clip[8:, :16, :16] = 255  # one patch changes at frame 8 (tubelet 4), then stays
  mask = kept_tokens.mask_at(clip[None], 0.1)[0]
  panels = kept_tokens.overlay(clip, mask)
  colours = kept_tokens.run_colours(8)
  assert (panels[2][100:110, 100:110] == 96).all()  # dropped: 0.25·0 + 0.75·128
  assert (panels[0][100:110, 100:110] == 0).all()  # the first tubelet is kept, inside unchanged
  assert (panels[0][0, 100] == colours[8]).all()  # … framed as a run of the whole clip
  assert (panels[0][0, 0] == colours[4]).all()  # the changing patch: runs 0–3, then 4–7
  assert (panels[8][1, 1] == colours[4]).all() and (panels[9][1, 1] == colours[4]).all()


def test_the_gif_shows_every_frame_beside_its_tokens(tmp_path):
  clip = moving_square()
  np.save(tmp_path / "clips.npy", clip[None])
  kept_tokens.main(["--frames", str(tmp_path / "clips.npy"), "--save_gif", str(tmp_path / "t.gif")])
  gif = Image.open(tmp_path / "t.gif")
  assert gif.n_frames == 8
  mask = kept_tokens.mask_at(clip[None], 0.1)[0]
  frames = kept_tokens.animation(clip, mask, 0.1, "clip 1 of 1 from clips.npy")
  assert gif.size == frames[0].shape[1::-1]
  gif.seek(3)
  shown = np.asarray(gif.convert("RGB")).astype(int)
  assert np.abs(shown - frames[3]).mean() < 8  # close: a GIF has 256 colours a frame (noise here)


@pytest.mark.parametrize("shape,tokens_each", [((8, 64, 64), 64), ((6, 64, 128), 96),
                                               ((16, 224, 224), 1568)])
def test_clips_of_any_tubelet_and_patch_multiple_are_counted(tmp_path, capsys, shape,
                                                             tokens_each):
  clips = np.random.RandomState(0).randint(0, 255, (3, *shape, 3), np.uint8)
  np.save(tmp_path / "clips.npy", clips)
  kept_tokens.main(["--frames", str(tmp_path / "clips.npy"), "--thresholds", "0,1000",
               "--save_png", str(tmp_path / "t.png")])
  out = capsys.readouterr().out
  t, h, w = shape
  assert f"3 clip(s) of {t} × {h}×{w} ({tokens_each} tokens each)" in out
  assert f"τ = 0: {tokens_each} of {tokens_each} kept" in out  # noise: every token changes
  assert f"τ = 1000: {tokens_each * 2 // t} of {tokens_each} kept" in out  # the first tubelet


def test_video_flags_set_the_clip_geometry(tmp_path, capsys):
  path = tmp_path / "square.mp4"
  video.write_moving_square(path, frames=70)
  kept_tokens.main(["--video", str(path), "--num_frames", "8", "--image_size", "64", "--stride",
               "2"])
  assert "4 clip(s) of 8 × 64×64 (64 tokens each)" in capsys.readouterr().out  # 70 // 16
  np.testing.assert_array_equal(
      kept_tokens.video_clips(str(path), num_frames=8, image_size=64, stride=2)[0],
      video.test_views(video.decode(str(path))[0], clips=4, crops=1, clip_len=8, stride=2,
                       size=64))


def test_data_flags_set_the_clip_geometry(tmp_path, capsys):
  synthetic.generate(str(tmp_path), train_videos=1, val_videos=3, size=64, num_frames=24)
  kept_tokens.main(["--data", str(tmp_path / "val.tfrecord-*"), "--num_frames", "8",
               "--image_size", "64", "--stride", "2", "--max_clips", "2"])
  assert "2 clip(s) of 8 × 64×64 (64 tokens each)" in capsys.readouterr().out


def test_an_npz_gives_its_frames_else_its_first_uint8_array_of_5_dims(tmp_path, fixtures_dir):
  fixture = fixtures_dir / "videomae2_tiny_expected.npz"  # the README's example
  np.testing.assert_array_equal(kept_tokens.load_clips(str(fixture)), np.load(fixture)["frames"])
  clips = np.zeros((2, 4, 32, 32, 3), np.uint8)
  np.savez(tmp_path / "clips.npz", logits=np.zeros((2, 5), np.float32),
           masks=np.zeros((2, 4, 2, 2, 1), bool), clips=clips)
  assert kept_tokens.load_clips(str(tmp_path / "clips.npz")).shape == clips.shape


def bad_inputs(tmp_path):
  """(arguments, what the error says) for inputs refused before any work."""
  clip = moving_square()[None]
  good = str(tmp_path / "good.npy")
  np.save(good, clip)
  arrays = {"float.npy": clip.astype(np.float32), "empty.npy": clip[:0], "odd_t.npy": clip[:, :7],
            "odd_h.npy": clip[:, :, :40], "4d.npy": clip[0], "grey.npy": clip[..., :1]}
  for name, array in arrays.items():
    np.save(tmp_path / name, array)
  np.savez(tmp_path / "logits.npz", logits=np.zeros((2, 400), np.float32))
  (tmp_path / "text.npy").write_text("not an array")
  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
  cases = [(["--frames", good, "--thresholds", t], "--thresholds")
           for t in ("nan", "-0.1", "inf", "0.1,,0.2", "abc")]
  cases += [(["--frames", str(tmp_path / name)], "expected uint8 clips (N, T, H, W, 3)")
            for name in arrays if name != "empty.npy"]
  cases += [
      (["--frames", str(tmp_path / "empty.npy")], "holds no clips"),
      (["--frames", str(tmp_path / "logits.npz")], "no array 'frames' and no uint8 array with "
       "5 dims; it holds logits float32 (2, 400)"),
      (["--frames", str(tmp_path / "text.npy")], "not a .npy or .npz of plain arrays"),
      (["--frames", str(tmp_path / "missing.npy")], "missing.npy: no such file"),
      (["--video", str(tmp_path / "missing.mp4")], "missing.mp4: no such file"),
      (["--video", str(tmp_path / "broken.mp4")], "broken.mp4: cannot read"),
      (["--video", good, "--num_frames", "7"], "--num_frames 7: expected a positive multiple"),
      (["--video", good, "--image_size", "100"], "--image_size 100: expected a positive"),
      (["--video", good, "--stride", "0"], "--stride 0: expected a positive multiple of 1"),
      (["--frames", good, "--max_clips", "0"], "--max_clips 0: expected a positive integer"),
      (["--frames", good, "--num_frames", "8"], "are for --video and --data"),
      (["--frames", good, "--save_png", str(tmp_path / "no" / "t.png")], "does not exist"),
      (["--frames", good, "--save_gif", str(tmp_path)], "is a directory"),
  ]
  return cases


def test_bad_inputs_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setattr(kept_tokens, "counts_at", lambda *a: pytest.fail("work began"))
  for argv, message in bad_inputs(tmp_path):
    with pytest.raises(SystemExit) as exit_:
      kept_tokens.main(argv)
    assert exit_.value.code.startswith("error: ") and message in exit_.value.code, argv
    assert "\n" not in exit_.value.code


def test_a_refusal_exits_non_zero_without_a_traceback(tmp_path):
  result = subprocess.run([sys.executable, "-m", "rlt_jax.kept_tokens", "--frames",
                           str(tmp_path / "missing.npy")], capture_output=True, text=True)
  assert result.returncode != 0
  assert result.stderr == f"error: {tmp_path / 'missing.npy'}: no such file\n"


def test_pictures_are_written_atomically_not_through_planted_links(tmp_path):
  clips = tmp_path / "clips.npy"
  np.save(clips, moving_square()[None])
  victim = tmp_path / "victim"
  victim.write_text("keep me")
  for name in ("t.png.tmp.png", "t.gif.tmp.gif", ".t.png.tmp", ".t.gif.tmp"):
    os.symlink(victim, tmp_path / name)  # the names a predictable writer would use
  kept_tokens.main(["--frames", str(clips), "--save_png", str(tmp_path / "t.png"), "--save_gif",
               str(tmp_path / "t.gif")])
  assert victim.read_text() == "keep me"
  assert Image.open(tmp_path / "t.png").format == "PNG"
  assert Image.open(tmp_path / "t.gif").format == "GIF"
  assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == [
      "clips.npy", "t.gif", "t.png", "victim"]  # no temporary left behind


def test_a_video_shorter_than_its_clip_marks_the_padding_and_leaves_it_out(tmp_path, capsys):
  """36 frames for a clip of 16 frames at stride 4 (61 frames): the clip's end repeats the
  last frame; tubelets made only of that are padding, drawn as such and never counted."""
  path = tmp_path / "short.mp4"
  video.write_moving_square(path, frames=36)
  png = tmp_path / "short.png"
  kept_tokens.main(["--video", str(path), "--save_png", str(png)])
  out = capsys.readouterr().out
  clips, sources = kept_tokens.video_clips(str(path))
  padded = kept_tokens.padded_tubelets(sources, 8)
  assert padded[0].tolist() == [False] * 5 + [True] * 3  # frames 36 … 60 do not exist
  assert "3 tubelet(s) past its end repeat the last frame" in out
  real = 5 * 196
  kept = int(kept_tokens.mask_at(clips, 0.1)[0, :5].sum())
  assert f"{kept} of {real} kept on average ({kept / real:.1%})" in out
  mask = kept_tokens.mask_at(clips, 0.1)[0]
  source = kept_tokens.Source(sources[0], 25.0)
  assert kept_tokens._tubelet_label(mask, 5, source) == [
      "tubelet 5: padding", "(past the video's end)", "not counted"]
  assert kept_tokens._tubelet_label(mask, 1, source)[:2] == ["tubelet 1: video frames 8-12",
                                                        "at 0.32-0.48 s"]
  heading = kept_tokens._heading(clips[0], mask, 0.1, "demo", source)
  assert heading[0] == f"RLT at tau = 0.1: {kept} of {real} tokens kept ({kept / real:.1%})"
  assert "last 3 tubelet(s) repeat the last frame" in heading[2]
  assert png.is_file()


def drifting_clips(size=64, frames=16):
  """uint8 clips: a still texture whose top-left 32² slowly brightens (1 level a frame)."""
  base = np.random.RandomState(0).randint(40, 200, (1, 1, size, size, 3))
  clips = np.repeat(base, frames, axis=1).astype(np.int32)
  clips[:, :, :32, :32] += np.arange(frames)[None, :, None, None, None]
  return clips.astype(np.uint8)


def test_the_run_start_reference_counts_the_drift_the_release_misses(tmp_path, capsys):
  path = tmp_path / "drift.npy"
  np.save(path, drifting_clips())
  kept_tokens.main(["--frames", str(path), "--thresholds", "0.06"])
  previous = capsys.readouterr().out
  kept_tokens.main(["--frames", str(path), "--thresholds", "0.06", "--reference", "run_start"])
  run_start = capsys.readouterr().out
  assert "runs compared with their start" in run_start
  count = lambda out: int(out.split("τ = 0.06: ")[1].split(" of")[0])
  assert count(previous) == 16 and count(run_start) > count(previous)  # tubelet 0 only


def test_the_training_share_is_given_both_ways(tmp_path, capsys):
  path = tmp_path / "clips.npy"
  np.save(path, np.concatenate([drifting_clips(), moving_square()[None].repeat(2, 1)
                                [:, :16].repeat(1, 0)[:1].repeat(1, 0)]))
  clips = np.load(path)
  after, before, batches = kept_tokens.train_time_fractions(clips, 0.1, "previous", 2)
  assert batches == 1 and 0 < after <= 1 and 0 < before <= 1
  kept_tokens.main(["--frames", str(path), "--train_batch", "2"])
  out = capsys.readouterr().out
  assert f"{after:.1%} kept with the mask of the mixed clips (the release), {before:.1%}" in out
  with pytest.raises(SystemExit, match=r"--train_batch 3: more than the 2 clip\(s\) of "):
    kept_tokens.main(["--frames", str(path), "--train_batch", "3"])


def test_a_sweep_gives_shares_that_fall_with_tau_and_the_tau_of_a_target(tmp_path, capsys):
  clips = np.stack([drifting_clips()[0], moving_square(frames=16)])
  rows = kept_tokens.sweep(clips, [0.0, 0.05, 0.1, 0.3], variant="S/16")
  shares = [r["kept_mean"] for r in rows]
  assert shares == sorted(shares, reverse=True)
  assert [r["ideal_speedup"] for r in rows] == sorted(r["ideal_speedup"] for r in rows)
  assert all(r["kept_p10"] <= r["kept_mean"] <= r["kept_p90"] for r in rows)
  tau, share = kept_tokens.threshold_for(clips, 0.3)
  total = len(clips) * 64
  assert share <= 0.3 < kept_tokens.counts_at(clips, tau - 2e-4).sum() / total  # the smallest
  path = tmp_path / "clips.npy"
  np.save(path, clips)
  kept_tokens.main(["sweep", "--frames", str(path), "--target", "0.3", "--save_png",
                    str(tmp_path / "s.png"), "--output", str(tmp_path / "s.json")])
  out = capsys.readouterr().out
  assert f"τ = {tau:.4g} keeps {share:.1%}" in out
  saved = json.loads((tmp_path / "s.json").read_text())
  assert saved["target"]["threshold"] == tau and len(saved["rows"]) == 10
  assert Image.open(tmp_path / "s.png").size == (640, 420)
  with pytest.raises(SystemExit, match="even τ = ∞ keeps"):  # below the first tubelets
    kept_tokens.main(["sweep", "--frames", str(path), "--target", "0.01"])
