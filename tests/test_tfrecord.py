"""tfrecord.py and dmvr.py: TFRecord framing, atomic shards, offset index, the DMVR layout."""

import os
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest

from rlt_jax import dmvr, tfrecord

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
  assert sorted(os.listdir(tmp_path)) == [shard.name, shard.name + ".index.npy"]
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
