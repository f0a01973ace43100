"""tfrecord.py and dmvr.py: TFRecord framing, atomic shards, offset index, the DMVR layout."""

import json
import os
import pathlib
import struct
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest

from rlt_jax.data import dmvr, tfrecord

TF_CHECK = os.path.join(os.path.dirname(__file__), "tf_read_check.py")


def test_crc32c_is_castagnoli_and_masked_as_tensorflow_does():
  assert google_crc32c.value(b"123456789") == 0xE3069283  # the CRC-32C check value
  crc = 0xE3069283
  assert tfrecord.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def records(n):
  return [dmvr.serialize(dmvr.VideoRecord([bytes([i]) * (10 + i)] * (i + 1), i, f"class {i}",
                                          f"video{i}", 25.0, i * 1000, i * 2000))
          for i in range(n)]


def test_a_shard_round_trips_with_its_index(tmp_path):
  shard = tmp_path / "train.tfrecord-00000-of-00001"
  with tfrecord.ShardWriter(shard) as writer:
    for payload in records(5):
      writer.write(payload)
  assert sorted(os.listdir(tmp_path)) == [".rlt_index", shard.name]
  assert os.listdir(tmp_path / ".rlt_index") == [shard.name + ".npy"]
  assert tfrecord.read_records(shard) == records(5)
  np.testing.assert_array_equal(tfrecord.read_index(shard), tfrecord.scan_index(shard))
  parsed = dmvr.parse(tfrecord.read_records(shard)[3])
  assert (parsed.label, parsed.text, parsed.video_id, parsed.frame_rate) == (3, "class 3",
                                                                              "video3", 25.0)
  assert len(parsed.jpegs) == 4 and parsed.start_us == 3000 and parsed.end_us == 6000


def test_a_failed_shard_leaves_nothing_behind(tmp_path):
  shard = tmp_path / "train.tfrecord-00000-of-00001"
  with pytest.raises(RuntimeError):
    with tfrecord.ShardWriter(shard) as writer:
      writer.write(records(1)[0])
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == []


def test_corruption_names_the_shard_and_offset(tmp_path):
  shard = tmp_path / "s.tfrecord"
  with tfrecord.ShardWriter(shard) as writer:
    for payload in records(3):
      writer.write(payload)
  offsets = tfrecord.read_index(shard)
  data = bytearray(shard.read_bytes())
  second = int(offsets[1, 0])
  data[second + 20] ^= 0xFF  # a payload byte of the second record
  shard.write_bytes(bytes(data))
  with pytest.raises(tfrecord.CorruptRecordError, match=f"s.tfrecord: CRC mismatch .* {second}"):
    tfrecord.read_records(shard)
  shard.write_bytes(bytes(data[:-5]))
  with pytest.raises(tfrecord.CorruptRecordError, match="truncated"):
    tfrecord.scan_index(shard)


def test_records_written_by_dmvr_tools_are_read(tmp_path):
  """MediaSequence naming (clip/label/string), no frame rate, no index file: still read."""
  from tensorflow_datasets.proto import tf_example_pb2
  example = tf_example_pb2.SequenceExample()
  example.context.feature["clip/label/index"].int64_list.value.append(7)
  example.context.feature["clip/label/string"].bytes_list.value.append(b"abseiling")
  for jpeg in (b"a", b"b"):
    example.feature_lists.feature_list["image/encoded"].feature.add().bytes_list.value.append(jpeg)
  shard = tmp_path / "dmvr.tfrecord"
  shard.write_bytes(tfrecord.frame(example.SerializeToString()) * 2)
  assert not tfrecord.index_path(shard).exists()
  assert tfrecord.read_index(shard).tolist() == [[0, len(shard.read_bytes()) // 2],
                                                 [len(shard.read_bytes()) // 2,
                                                  len(shard.read_bytes()) // 2]]
  record = dmvr.parse(tfrecord.read_records(shard)[1])
  assert (record.label, record.text, record.jpegs, record.frame_rate) == (7, "abseiling",
                                                                          [b"a", b"b"], 0.0)
  with pytest.raises(ValueError, match="image/encoded"):
    dmvr.parse(tf_example_pb2.SequenceExample().SerializeToString())


def tensorflow_python():
  """A Python with TensorFlow: this one, or the one named by RLT_TF_PYTHON."""
  try:
    import tensorflow  # noqa: F401
    return sys.executable
  except ImportError:
    return os.environ.get("RLT_TF_PYTHON") or pytest.skip(
        "TensorFlow is not installed (set RLT_TF_PYTHON to a Python that has it)")


def test_tensorflow_reads_what_we_write(tmp_path):
  shard = tmp_path / "train.tfrecord-00000-of-00001"
  with tfrecord.ShardWriter(shard) as writer:
    for payload in records(4):
      writer.write(payload)
  out = subprocess.run([tensorflow_python(), TF_CHECK, str(shard)], capture_output=True,
                       text=True, check=True).stdout
  assert out.split() == ["0:1:video0", "1:2:video1", "2:3:video2", "3:4:video3"]


def write_shard(path, n=3):
  with tfrecord.ShardWriter(path) as writer:
    for payload in records(n):
      writer.write(payload)
  return path


def test_writers_never_follow_a_symlink_planted_at_a_temporary_name(tmp_path):
  """The old writers used `.NAME.tmp`: anyone who can write the directory could aim it elsewhere."""
  victim = tmp_path / "victim"
  victim.write_bytes(b"precious")
  shard = tmp_path / "train.tfrecord-00000-of-00001"
  index = pathlib.Path(tfrecord.index_path(shard))
  index.parent.mkdir(exist_ok=True)
  for planted in {tmp_path / f".{shard.name}.tmp", tmp_path / f".{shard.name}.index.npy.tmp",
                  index.parent / f".{index.name}.tmp"}:
    planted.symlink_to(victim)
  write_shard(shard)
  assert victim.read_bytes() == b"precious"
  assert tfrecord.read_records(shard) == records(3)


def test_the_index_is_hidden_from_shard_globs(tmp_path):
  """tf.data and Scenic read every file `train.tfrecord-*` matches: an index there is a bad
  shard."""
  shard = write_shard(tmp_path / "train.tfrecord-00000-of-00001")
  assert [p.name for p in tmp_path.glob("train.tfrecord-*")] == [shard.name]
  assert tfrecord.index_path(shard) == tmp_path / ".rlt_index" / f"{shard.name}.npy"
  np.testing.assert_array_equal(np.load(tfrecord.index_path(shard)), tfrecord.scan_index(shard))


def test_a_legacy_index_beside_the_shard_is_ignored(tmp_path, caplog):
  shard = tmp_path / "dmvr.tfrecord-00000-of-00001"
  shard.write_bytes(b"".join(map(tfrecord.frame, records(3))))
  np.save(tmp_path / f"{shard.name}.index.npy", np.zeros((1, 2), np.int64))
  np.testing.assert_array_equal(tfrecord.read_index(shard), tfrecord.scan_index(shard))
  assert [s.name for s in tfrecord.list_shards(str(tmp_path / "dmvr.tfrecord-*"))] == [shard.name]


@pytest.mark.parametrize("damage, problem", [
    (lambda x: x[:-1], "the records end at"),                         # a short index
    (lambda x: np.concatenate([x, [[x[-1].sum(), 40]]]), "the records end at"),  # one too many
    (lambda x: x.astype(np.int32), "int64"),
    (lambda x: x[:, :1], "int64"),
    (lambda x: np.where(x == x[0, 0], -8, x), "starts at -8"),       # a negative offset
    (lambda x: np.where(x == x[1, 1], 2**62, x), "length"),           # a huge length
    (lambda x: np.where(x == x[2, 1], 3, x), "length 3"),
    (lambda x: x[[1, 0, 2]], "starts at"),                            # shuffled rows
])
def test_a_stale_or_damaged_index_falls_back_to_a_header_scan(tmp_path, caplog, damage, problem):
  shard = write_shard(tmp_path / "s.tfrecord", n=4)
  index = tfrecord.index_path(shard)
  good = np.load(index)
  np.save(index, damage(good))
  np.testing.assert_array_equal(tfrecord.read_index(shard), good)
  assert f"{shard}: ignoring its offset index" in caplog.text and problem in caplog.text


def test_an_unreadable_index_or_a_rewritten_shard_falls_back_to_a_header_scan(tmp_path, caplog):
  shard = write_shard(tmp_path / "s.tfrecord", n=4)
  index = tfrecord.index_path(shard)
  good = np.load(index)
  index.write_bytes(b"\x93NUMPY garbage")
  np.testing.assert_array_equal(tfrecord.read_index(shard), good)
  assert "unreadable" in caplog.text
  write_shard(shard, n=4)
  shard.write_bytes(b"".join(map(tfrecord.frame, records(5))))  # rewritten, index left behind
  assert len(tfrecord.read_index(shard)) == 5


def test_an_index_that_checks_out_is_used_without_a_scan(tmp_path, monkeypatch):
  shard = write_shard(tmp_path / "s.tfrecord", n=4)
  monkeypatch.setattr(tfrecord, "scan_index", lambda s: pytest.fail("scanned"))
  assert len(tfrecord.read_index(shard)) == 4
  empty = write_shard(tmp_path / "e.tfrecord", n=0)
  assert tfrecord.read_index(empty).shape == (0, 2)


def test_a_record_header_that_lies_names_the_shard_and_offset(tmp_path):
  shard = tmp_path / "s.tfrecord"
  first, second = map(tfrecord.frame, records(2))
  length = struct.pack("<Q", 2**40)
  lying = length + struct.pack("<I", tfrecord.masked_crc32c(length)) + second[12:]
  shard.write_bytes(first + lying)
  with pytest.raises(tfrecord.CorruptRecordError, match=f"s.tfrecord: .*offset {len(first)}"):
    tfrecord.read_index(shard)
  with pytest.raises(tfrecord.CorruptRecordError, match=f"s.tfrecord: .*offset {len(first)}"):
    tfrecord.unframe(shard, len(first), lying)


def shard_set(folder, prefix="train.tfrecord", count=4, present=None):
  folder.mkdir(parents=True, exist_ok=True)
  for i in present if present is not None else range(count):
    write_shard(folder / f"{prefix}-{i:05d}-of-{count:05d}", n=1)


def test_list_shards_sorts_and_skips_indices_and_hidden_files(tmp_path):
  shard_set(tmp_path, count=3)
  (tmp_path / ".train.tfrecord-00003-of-00003.abc.tmp").write_bytes(b"half")
  (tmp_path / "train.tfrecord-00000-of-00003.index.npy").write_bytes(b"old")
  names = [p.name for p in tfrecord.list_shards(f" {tmp_path}/train.tfrecord-* ,,")]
  assert names == [f"train.tfrecord-0000{i}-of-00003" for i in range(3)]
  both = tfrecord.list_shards(f"{tmp_path}/train.tfrecord-*,{tmp_path}/train.tfrecord-00001-*")
  assert len(both) == 3  # a shard matched twice is read once


def test_list_shards_refuses_an_incomplete_set(tmp_path):
  shard_set(tmp_path, count=10, present=[0, 1, 2])
  pattern = f"{tmp_path}/train.tfrecord-*"
  with pytest.raises(ValueError, match=r"train.tfrecord: 3 of 10 shards .* missing "
                     r"train.tfrecord-00003-of-00010, train.tfrecord-00004-of-00010, "):
    tfrecord.list_shards(pattern)
  assert len(tfrecord.list_shards(pattern, allow_incomplete=True)) == 3
  shard_set(tmp_path / "a", count=2, present=[0, 1, 2])
  with pytest.raises(ValueError, match=r"train.tfrecord-00002-of-00002: numbered past the end"):
    tfrecord.list_shards(f"{tmp_path}/a/train.tfrecord-*")
  shard_set(tmp_path / "b", count=2)
  shard_set(tmp_path / "b", count=3)
  with pytest.raises(ValueError, match=r"-of-00002 and -of-00003"):
    tfrecord.list_shards(f"{tmp_path}/b/train.tfrecord-*")


def test_list_shards_checks_the_build_summary(tmp_path):
  shard_set(tmp_path, count=2)
  pattern = f"{tmp_path}/train.tfrecord-*"
  summary = tmp_path / "train.summary.json"
  summary.write_text(json.dumps({"split": "train", "shards": 2, "complete": False}))
  with pytest.raises(ValueError, match="train.summary.json: the build has not finished"):
    tfrecord.list_shards(pattern)
  summary.write_text(json.dumps({"split": "train", "shards": 5, "complete": True}))
  with pytest.raises(ValueError, match="describes a build of 5 shards"):
    tfrecord.list_shards(pattern)
  summary.write_text(json.dumps({"split": "train", "shards": 2, "complete": True}))
  assert len(tfrecord.list_shards(pattern)) == 2


def test_list_shards_says_how_to_build_missing_data(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no TFRecord shards match '.*/nothing-\*'.*"
                     r"python data/build_tfrecords.py"):
    tfrecord.list_shards(f"{tmp_path}/nothing-*")
