"""data/build_tfrecords.py: annotations → DMVR shards, bad videos skipped, resumable."""

import json
import os

import pytest

from rlt_jax import build_tfrecords, dmvr, input_pipeline, tfrecord, video
from videos import write_video

GOOD = {"abc_000010_000020": ("juggling", ".mp4"), "def_000000_000010": ("abseiling", ".mp4"),
        "ghi_000005_000015": ("juggling", ".webm"), "jkl_000001_000011": ("zumba", ".avi"),
        "mno_000002_000012": ("abseiling", ".mp4")}
BAD = {"corrupt_000000_000010": ("zumba", ".mp4"), "empty_000000_000010": ("zumba", ".mp4"),
       "short_000000_000010": ("zumba", ".mp4"), "missing_000000_000010": ("zumba", ".mp4")}


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
  """A Kinetics-style folder (one sub-folder per class) with good and bad videos, and its CSV."""
  root = tmp_path_factory.mktemp("kinetics")
  for video_id, (label, suffix) in {**GOOD, **BAD}.items():
    folder = root / "videos" / label
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (video_id + suffix)
    if video_id.startswith("corrupt"):
      path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    elif video_id.startswith("empty"):
      path.write_bytes(b"")
    elif video_id.startswith("short"):
      write_video(path, frames=5, height=96, width=128)
    elif not video_id.startswith("missing"):
      write_video(path, frames=20, height=96, width=128)
  lines = ["label,youtube_id,time_start,time_end,split"]
  for video_id, (label, _) in {**GOOD, **BAD}.items():
    youtube_id, start, end = video_id.rsplit("_", 2)
    lines.append(f"{label},{youtube_id},{int(start)},{int(end)},train")
  (root / "train.csv").write_text("\n".join(lines) + "\n")
  return root


def convert(kinetics, out, **extra):
  args = ["--format", "kinetics", "--annotations", str(kinetics / "train.csv"),
          "--video_dir", str(kinetics / "videos"), "--output_dir", str(out), "--split", "train",
          "--short_side", "64", "--min_frames", "8"]
  for key, value in extra.items():
    args += [f"--{key}", str(value)]
  build_tfrecords.main(args)


def test_kinetics_round_trip_with_bad_videos_skipped(kinetics, tmp_path, capsys):
  out = tmp_path / "out"
  convert(kinetics, out, num_shards=3, workers=2)
  assert "5 of 9 videos written to 3 shards" in capsys.readouterr().out
  classes = (out / "classes.txt").read_text().split("\n")[:-1]
  assert classes == ["abseiling", "juggling", "zumba"]
  summary = json.loads((out / "train.summary.json").read_text())
  reasons = {s["video"]: s["reason"] for s in summary["skipped"]}
  assert summary["written"] == 5 and summary["skipped_count"] == 4
  assert reasons["missing_000000_000010"] == "video file not found"
  assert reasons["short_000000_000010"].startswith("too short: 5 frames")
  assert "cannot decode" in reasons["corrupt_000000_000010"]
  assert "empty_000000_000010" in reasons

  shards = input_pipeline.list_shards(str(out / "train.tfrecord-*"))
  assert [s.name for s in shards] == [f"train.tfrecord-0000{i}-of-00003" for i in range(3)]
  parsed = {r.video_id: r for s in shards for r in map(dmvr.parse, tfrecord.read_records(s))}
  assert set(parsed) == set(GOOD)
  for video_id, (label, suffix) in GOOD.items():
    record = parsed[video_id]
    assert record.label == classes.index(label) and record.text == label
    assert len(record.jpegs) == 20 and record.frame_rate == 25.0
    assert video.decode_jpeg(record.jpegs[0]).shape == (64, 85, 3)  # short side 64
    assert record.start_us == int(video_id.split("_")[1]) * 1_000_000
  # The stored JPEG is exactly the source's first frame, resized and encoded at quality 90.
  source = kinetics / "videos" / "juggling" / "abc_000010_000020.mp4"
  first = video.resize(video.decode(str(source))[0][0], (64, 85))
  assert parsed["abc_000010_000020"].jpegs[0] == video.encode_jpeg(first, 90)


def test_an_interrupted_conversion_resumes_without_redoing_finished_shards(kinetics, tmp_path,
                                                                            monkeypatch):
  out = tmp_path / "out"
  real_encode, calls, armed = build_tfrecords.encode, [], [True]

  def dies_on_the_fifth(entry, encoding):
    calls.append(entry.video_id)
    if armed[0] and len(calls) == 5:
      raise RuntimeError("killed")
    return real_encode(entry, encoding)

  monkeypatch.setattr(build_tfrecords, "encode", dies_on_the_fifth)
  with pytest.raises(RuntimeError, match="killed"):
    convert(kinetics, out, num_shards=3, workers=1)
  finished = sorted(p.name for p in out.glob("train.tfrecord-*") if "index" not in p.name)
  assert finished == ["train.tfrecord-00000-of-00003"]  # shards of 3 videos: one complete
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written shard
  mtime = (out / finished[0]).stat().st_mtime_ns

  calls.clear()
  armed[0] = False
  convert(kinetics, out, num_shards=3, workers=1)
  assert len(calls) == 6  # only the two unfinished shards were converted
  assert (out / finished[0]).stat().st_mtime_ns == mtime
  summary = json.loads((out / "train.summary.json").read_text())
  assert summary["written"] + summary["skipped_count"] == 9
  with pytest.raises(SystemExit, match="unfinished 'train' conversion"):
    (out / "train.tfrecord-00002-of-00003").unlink()
    convert(kinetics, out, num_shards=2, workers=1)


def test_ssv2_templates_become_labels_and_webm_is_read(tmp_path, capsys):
  videos = tmp_path / "20bn"
  videos.mkdir()
  for i in (1, 2):
    write_video(videos / f"{i}.webm", frames=12, height=60, width=80, rate=12)
  (tmp_path / "labels.json").write_text(json.dumps(
      {"Pushing something from left to right": "0", "Putting something on something": "1"}))
  (tmp_path / "train.json").write_text(json.dumps([
      {"id": "1", "label": "pushing a cup from left to right",
       "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
      {"id": "2", "label": "putting a pen on a book",
       "template": "Putting [something] on [something]", "placeholders": ["a pen", "a book"]}]))
  build_tfrecords.main(["--format", "ssv2", "--annotations", str(tmp_path / "train.json"),
                        "--video_dir", str(videos), "--output_dir", str(tmp_path / "out"),
                        "--split", "train", "--workers", "1", "--min_frames", "4"])
  records = [dmvr.parse(r) for r in tfrecord.read_records(
      tmp_path / "out" / "train.tfrecord-00000-of-00001")]
  assert sorted((r.video_id, r.label, r.frame_rate) for r in records) == [("1", 0, 12.0),
                                                                          ("2", 1, 12.0)]
  assert video.decode_jpeg(records[0].jpegs[0]).shape[0] == 256  # short side (height) 256


def test_path_label_lists_and_bad_annotations(tmp_path):
  write_video(tmp_path / "a.mp4", frames=10, height=48, width=64)
  (tmp_path / "list.txt").write_text("a.mp4 3\n")
  base = ["--video_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--split", "x",
          "--workers", "1", "--min_frames", "4", "--short_side", "32"]
  build_tfrecords.main(["--format", "list", "--annotations", str(tmp_path / "list.txt"), *base])
  (record,) = map(dmvr.parse, tfrecord.read_records(tmp_path / "out" / "x.tfrecord-00000-of-00001"))
  assert (record.label, record.video_id) == (3, "a")
  (tmp_path / "bad.txt").write_text("a.mp4 three\n")
  with pytest.raises(SystemExit, match=r"bad.txt:1: expected 'PATH LABEL'"):
    build_tfrecords.main(["--format", "list", "--annotations", str(tmp_path / "bad.txt"), *base])
  (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                  "unheard of,abc,0,10,train\n")
  (tmp_path / "classes.txt").write_text("juggling\n")
  with pytest.raises(SystemExit, match=r"k.csv:2: label 'unheard of' is not in the class list"):
    build_tfrecords.main(["--format", "kinetics", "--annotations", str(tmp_path / "k.csv"),
                          "--classes", str(tmp_path / "classes.txt"), *base])
  with pytest.raises(SystemExit, match="--annotations .*nowhere.csv: no such file"):
    build_tfrecords.main(["--format", "kinetics", "--annotations", str(tmp_path / "nowhere.csv"),
                          *base])
