"""data/build_tfrecords.py: annotations → DMVR shards, bad videos skipped, resumable."""

import json
import os
import subprocess
import sys

import pytest

from rlt_jax.data import build_tfrecords, dmvr, tfrecord, video
from rlt_jax.runtime import files

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
      video.write_moving_square(path, frames=5, height=96, width=128)
    elif not video_id.startswith("missing"):
      video.write_moving_square(path, frames=20, height=96, width=128)
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

  shards = tfrecord.list_shards(str(out / "train.tfrecord-*"))
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

  convert(kinetics, out, num_shards=3, workers=2)  # a rerun has nothing left to do
  assert capsys.readouterr().out.startswith("train: already complete, nothing to do: 5 of 9 "
                                            "videos in 3 shards")


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
  finished = sorted(p.name for p in out.glob("train.tfrecord-*"))
  assert finished == ["train.tfrecord-00000-of-00003"]  # shards of 3 videos: one complete
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written shard
  assert json.loads((out / "train.summary.json").read_text())["complete"] is False
  with pytest.raises(ValueError, match="1 of 3 shards present"):
    tfrecord.list_shards(str(out / "train.tfrecord-*"))
  mtime = (out / finished[0]).stat().st_mtime_ns

  calls.clear()
  armed[0] = False
  convert(kinetics, out, num_shards=3, workers=1)
  assert len(calls) == 6  # only the two unfinished shards were converted
  assert (out / finished[0]).stat().st_mtime_ns == mtime
  summary = json.loads((out / "train.summary.json").read_text())
  assert summary["written"] + summary["skipped_count"] == 9 and summary["complete"] is True
  assert len(tfrecord.list_shards(str(out / "train.tfrecord-*"))) == 3
  with pytest.raises(SystemExit, match=r"differs from this one \(its shard count differs "
                     r"\(3, now 2\)\).*--overwrite"):
    (out / "train.tfrecord-00002-of-00003").unlink()
    convert(kinetics, out, num_shards=2, workers=1)


def test_ssv2_templates_become_labels_and_webm_is_read(tmp_path, capsys):
  videos = tmp_path / "20bn"
  videos.mkdir()
  for i in (1, 2):
    video.write_moving_square(videos / f"{i}.webm", frames=12, height=60, width=80, rate=12)
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
  video.write_moving_square(tmp_path / "a.mp4", frames=10, height=48, width=64)
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


def tiny_list(tmp_path, lines=("a.mp4 0", "b.mp4 1")):
  """A 'path label' list of two short videos, and the arguments that convert it."""
  for name in ("a.mp4", "b.mp4"):
    if not (tmp_path / name).exists():
      video.write_moving_square(tmp_path / name, frames=6, height=32, width=48)
  (tmp_path / "list.txt").write_text("".join(f"{line}\n" for line in lines))
  return ["--format", "list", "--annotations", str(tmp_path / "list.txt"), "--video_dir",
          str(tmp_path), "--output_dir", str(tmp_path / "out"), "--split", "x", "--workers", "1",
          "--min_frames", "4", "--short_side", "32"]


def test_no_write_follows_a_symlink_planted_at_a_temporary_name(tmp_path, victim):
  """The old writers used `.NAME.tmp` (classes: `classes.txt.tmp`) under the output folder."""
  out = tmp_path / "out"
  (out / ".x.progress").mkdir(parents=True)
  for name in (".x.summary.json.tmp", "classes.txt.tmp", ".x.tfrecord-00000-of-00001.tmp",
               ".x.tfrecord-00000-of-00001.index.npy.tmp", ".x.progress/.plan.json.tmp",
               ".x.progress/.00000.json.tmp"):
    (out / name).symlink_to(victim)
  build_tfrecords.main(tiny_list(tmp_path))
  assert victim.read_text() == "precious"
  assert json.loads((out / "x.summary.json").read_text())["complete"] is True


def test_a_rerun_with_other_labels_is_refused_and_overwrite_rebuilds(tmp_path):
  """Resuming used to check only the video ids: new labels landed next to shards of old ones."""
  args = tiny_list(tmp_path) + ["--num_shards", "2"]
  build_tfrecords.main(args)
  tiny_list(tmp_path, ["a.mp4 1", "b.mp4 0"])
  with pytest.raises(SystemExit, match=r"videos or labels of 2 of its shards differ: "
                     r"x.tfrecord-00000-of-00002, x.tfrecord-00001-of-00002\).*--overwrite"):
    build_tfrecords.main(args)
  build_tfrecords.main(args + ["--overwrite"])
  shards = tfrecord.list_shards(str(tmp_path / "out" / "x.tfrecord-*"))
  labels = {r.video_id: r.label for s in shards for r in map(dmvr.parse, tfrecord.read_records(s))}
  assert labels == {"a": 1, "b": 0}
  with pytest.raises(SystemExit, match=r"classes.txt:1: lists other classes .*'0' vs 'walk'"):
    (tmp_path / "c.txt").write_text("walk\nrun\n")
    build_tfrecords.main(args + ["--overwrite", "--classes", str(tmp_path / "c.txt")])
  build_tfrecords.main([*tiny_list(tmp_path, ["a.mp4 1"]), "--split", "y"])  # shares classes.txt


def test_repeated_videos_are_dropped_and_conflicting_ones_refused(tmp_path, caplog):
  build_tfrecords.main(tiny_list(tmp_path, ["a.mp4 0", "b.mp4 1", "a.mp4 0"]))
  assert "videos listed again with the same label: 1" in caplog.text
  assert "'a' at " in caplog.text and "list.txt:3 (first at " in caplog.text
  (record_a, record_b) = sorted(map(dmvr.parse, tfrecord.read_records(
      tmp_path / "out" / "x.tfrecord-00000-of-00001")), key=lambda r: r.video_id)
  assert (record_a.video_id, record_b.video_id) == ("a", "b")
  with pytest.raises(SystemExit, match=r"videos listed again with other values: 1 \('a' at "
                     r".*list.txt:1 and .*list.txt:3: label 0 vs 1"):
    build_tfrecords.main(tiny_list(tmp_path, ["a.mp4 0", "b.mp4 1", "a.mp4 1"]) + ["--overwrite"])


def test_bad_input_is_one_line_naming_file_and_line_before_any_work(tmp_path):
  base = ["--video_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--split", "x"]

  def fails(name, content, match, fmt="kinetics", extra=()):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit, match=match):
      build_tfrecords.main(["--format", fmt, "--annotations", str(tmp_path / name), *base,
                            *extra])

  header = b"label,youtube_id,time_start,time_end,split\n"
  fails("short.csv", header + b"a,abc,0,10,train\nb,def,0\n",
        r"short.csv:3: expected 5 fields \(label,youtube_id,time_start,time_end,split\), got 3")
  fails("long.csv", header + b"a,abc,0,10,train,extra\n", r"long.csv:2: expected 5 fields")
  fails("latin1.csv", header + b"caf\xe9,abc,0,10,train\n",
        r"latin1.csv:2: byte 0xe9 at column 4 is not UTF-8; expected a Kinetics CSV in UTF-8")
  fails("nolabel.csv", header + b",abc,0,10,train\n", r"nolabel.csv:2: expected a label")
  fails("header.csv", b"a,b\n1,2\n", r"header.csv:1: expected a Kinetics CSV header")
  fails("list.txt", b"a.mp4 0\n\xff.mp4 1\n", r"list.txt:2: byte 0xff .* not UTF-8", "list")
  (tmp_path / "labels.json").write_text('{"Pushing": "0", "Pulling": "2"}')
  fails("train.json", b'[{"id": "1", "template": "Pushing"}]',
        r"labels.json: expected \{template: index\} with each index from 0", "ssv2")
  (tmp_path / "labels.json").write_text('{"Pushing": "0", "Pulling": "1"}')
  fails("train.json", b'[{"id": "1",\n "template": "Pushing"\n', r"train.json:3: ", "ssv2")
  fails("train.json", b'[{"id": "1", "template": "Poking"}]',
        r"train.json: item 0 \(id 1\): template 'Poking' is not in", "ssv2")
  with pytest.raises(SystemExit, match=r"--video_dir .*nowhere: no such directory"):
    build_tfrecords.main(["--format", "list", "--annotations", str(tmp_path / "list.txt"),
                          "--video_dir", str(tmp_path / "nowhere"), "--output_dir", "o",
                          "--split", "x"])
  assert not (tmp_path / "out").exists()  # nothing was written


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
  (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\na,abc\n")
  script = os.path.join(os.path.dirname(__file__), "..", "data", "build_tfrecords.py")
  result = subprocess.run(
      [sys.executable, script, "--format", "kinetics", "--annotations", str(tmp_path / "k.csv"),
       "--video_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--split", "x"],
      capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr == f"error: {tmp_path / 'k.csv'}:2: expected 5 fields " \
                          "(label,youtube_id,time_start,time_end,split), got 2\n"


def test_two_conversions_of_one_split_do_not_run_at_once(tmp_path):
  (tmp_path / "out" / ".x.progress").mkdir(parents=True)
  with files.workdir_lock(tmp_path / "out" / ".x.progress"):
    with pytest.raises(SystemExit, match="another conversion of 'x' is running there"):
      build_tfrecords.main(tiny_list(tmp_path))
