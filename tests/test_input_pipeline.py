"""input_pipeline.py: global shuffling, per-process shares, exact resume, eval views, bad data."""

import dataclasses
import shutil

import numpy as np
import pytest

from rlt_jax import rlt
from rlt_jax.data import dmvr, input_pipeline, synthetic, tfrecord, video

SAMPLING = input_pipeline.Sampling(num_frames=4, stride=2, image_size=32, flip=True)
MULTI_VIEW = dataclasses.replace(SAMPLING, views=(2, 3))
RLT = rlt.Policy("rlt", 0.1)
KEPT = rlt.KeptCount(RLT, tubelet_size=2, patch_size=8)  # the caller's cost of a clip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(out), train_videos=24, val_videos=10, size=48, num_frames=16,
                     videos_per_shard=8)
  return out


def train(data, **kw):
  kw = {"mode": "train", "sampling": SAMPLING, "batch_size": 4, **kw}
  return input_pipeline.make_dataset(str(data / "train.tfrecord-*"), **kw)


def take(dataset, n):
  it = iter(dataset)
  return [next(it) for _ in range(n)]


def test_train_batches_are_uint8_clips_with_their_labels(data):
  (batch,) = take(train(data), 1)
  assert batch["frames"].shape == (4, 4, 32, 32, 3) and batch["frames"].dtype == np.uint8
  assert batch["valid"].all() and not batch["error"].any()
  source = input_pipeline.RecordSource(input_pipeline.list_shards(str(data / "train.tfrecord-*")))
  for index, label in zip(batch["index"], batch["label"]):
    _, shard, offset, raw = source[int(index)]
    assert dmvr.parse(tfrecord.unframe(shard, offset, raw)).label == label == index % 8


def test_each_epoch_is_a_new_permutation_of_every_example(data):
  batches = take(train(data, batch_size=1, num_epochs=2), 48)
  order = [int(b["index"][0]) for b in batches]
  assert sorted(order[:24]) == sorted(order[24:]) == list(range(24))
  assert order[:24] != order[24:]


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_processes_share_every_example_exactly_once_per_epoch(data, processes):
  seen = []
  for p in range(processes):
    ds = train(data, batch_size=2, num_epochs=1, process_index=p, process_count=processes)
    seen += [int(i) for b in ds for i in b["index"]]
  assert sorted(seen) == list(range(24))


def test_global_batches_do_not_depend_on_the_number_of_processes(data):
  one = take(train(data, batch_size=8, num_epochs=None), 4)
  shares = [take(train(data, batch_size=2, process_index=p, process_count=4), 4)
            for p in range(4)]
  for k in range(4):
    rows = np.concatenate([shares[p][k]["frames"] for p in range(4)])
    np.testing.assert_array_equal(rows, one[k]["frames"])


def test_the_same_seed_gives_the_same_batches_and_another_seed_does_not(data):
  a, b, c = take(train(data), 2), take(train(data), 2), take(train(data, seed=1), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["frames"], y["frames"])
  assert not np.array_equal(a[0]["index"], c[0]["index"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_iterator_continues_with_exactly_the_same_batches(data, workers):
  iterator = iter(train(data, workers=workers))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary (6 per epoch)
  resumed = iter(train(data, workers=workers))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["frames"], want["frames"])


def test_flipping_follows_the_dataset_config(data):
  """A frame whose left half is dark: flipped clips have it on the right."""
  jpeg = video.encode_jpeg(np.concatenate([np.zeros((48, 24, 3), np.uint8),
                                           np.full((48, 24, 3), 255, np.uint8)], 1), 95)
  record = dmvr.VideoRecord([jpeg] * 8, 0)
  wide = dataclasses.replace(SAMPLING, min_area=1.0, max_area=1.0, min_ratio=1, max_ratio=1)

  def left_is_dark(sampling, seed):
    clip = input_pipeline.train_clip(record, np.random.default_rng(seed), sampling)
    return clip[0, :, :8].mean() < clip[0, :, -8:].mean()

  assert all(left_is_dark(dataclasses.replace(wide, flip=False), s) for s in range(40))
  flipped = [not left_is_dark(wide, s) for s in range(40)]
  assert 5 < sum(flipped) < 35


def test_a_whole_frame_at_the_model_size_is_used_as_decoded():
  rng = np.random.default_rng(0)
  jpegs = [video.encode_jpeg(rng.integers(0, 255, (32, 32, 3), np.uint8), 90) for _ in range(8)]
  record = dmvr.VideoRecord(jpegs, 0)
  whole = dataclasses.replace(SAMPLING, min_area=1.0, max_area=1.0, flip=False)
  clip = input_pipeline.train_clip(record, np.random.default_rng(1), whole)
  decoded = [video.decode_jpeg(j) for j in jpegs]
  assert all(any(np.array_equal(frame, d) for d in decoded) for frame in clip)  # no resampling


def test_random_resized_crops_respect_area_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = input_pipeline.random_resized_crop_box(rng, 256, 340, SAMPLING)
    assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 340
    assert 0.5 * 256 * 340 * 0.97 <= h * w <= 256 * 340 and 0.7 <= w / h <= 1.4


def test_eval_views_are_deterministic_complete_and_padded_alike_on_every_process(data):
  def run(sampling, process_index=0, process_count=1):
    return list(input_pipeline.make_dataset(
        str(data / "val.tfrecord-*"), mode="eval", sampling=sampling, batch_size=4,
        process_index=process_index, process_count=process_count))

  test = run(MULTI_VIEW)
  again = run(MULTI_VIEW)
  for x, y in zip(test, again):
    np.testing.assert_array_equal(x["frames"], y["frames"])
  valid = np.concatenate([b["valid"] for b in test])
  pairs = {(int(i), int(v)) for b in test for i, v, ok in zip(b["index"], b["view"], b["valid"])
           if ok}
  assert valid.sum() == 60 and pairs == {(i, v) for i in range(10) for v in range(6)}
  assert len(run(SAMPLING)) == 3 and sum(b["valid"].sum() for b in run(SAMPLING)) == 10
  shares = [run(MULTI_VIEW, p, 3) for p in range(3)]
  assert len({len(s) for s in shares}) == 1  # the same number of batches everywhere
  assert sum(b["valid"].sum() for s in shares for b in s) == 60


def test_multi_views_are_the_release_views_of_the_stored_frames(data):
  source = input_pipeline.RecordSource(input_pipeline.list_shards(str(data / "val.tfrecord-*")))
  _, shard, offset, raw = source[3]
  record = dmvr.parse(tfrecord.unframe(shard, offset, raw))
  frames = [video.decode_jpeg(j) for j in record.jpegs]
  expected = video.test_views(frames, clips=2, crops=3, clip_len=4, stride=2, size=32)
  got = [input_pipeline.eval_clip(record, v, MULTI_VIEW) for v in range(6)]
  np.testing.assert_array_equal(np.stack(got), expected)


def test_examples_carry_the_callers_cost_here_the_kept_tokens_of_the_device_rule(data):
  (batch,) = take(train(data, cost=KEPT), 1)
  mask = rlt.select(rlt.normalize(batch["frames"]), RLT, tubelet_size=2, patch_size=8)
  np.testing.assert_array_equal(batch["cost"], np.asarray(mask).sum(-1))
  assert "cost" not in take(train(data), 1)[0]  # without one, the pipeline computes nothing


# ------------------------------------------------------------------ length-aware order


def test_record_costs_are_the_kept_counts_of_each_centre_clip(data, tmp_path):
  sampling = SAMPLING
  patterns = str(data / "train.tfrecord-*")
  costs = input_pipeline.record_costs(patterns, sampling, KEPT, cache_dir=str(tmp_path))
  source = input_pipeline.open_source(patterns)
  for i in (0, 5, 17):
    _, shard, offset, raw = source[i]
    clip = input_pipeline.eval_clip(dmvr.parse(tfrecord.unframe(shard, offset, raw)), 0,
                                    sampling)
    assert costs[i] == rlt.kept_counts(clip[None], RLT, tubelet_size=2, patch_size=8)[0]
  assert len(list(tmp_path.iterdir())) == 1  # cached
  np.testing.assert_array_equal(
      input_pipeline.record_costs(patterns, sampling, KEPT, cache_dir=str(tmp_path)), costs)


def sorted_train(data, costs, **kw):
  return train(data, costs=costs, sort_window=3, **kw)


def test_sorted_windows_give_batches_of_similar_cost_and_still_every_record_once(data):
  costs = np.arange(24)[::-1] * 10  # record i costs 230 − 10 i
  batches = take(sorted_train(data, costs, batch_size=4, num_epochs=2), 12)
  for epoch in (batches[:6], batches[6:]):
    assert sorted(int(i) for b in epoch for i in b["index"]) == list(range(24))
  for b in batches:  # within a window of 3 batches, each batch holds 4 consecutive costs
    spread = costs[b["index"]].max() - costs[b["index"]].min()
    assert spread <= 10 * (3 * 4 - 1)
  spreads = [np.ptp(costs[b["index"]]) for b in batches]
  unsorted = [np.ptp(costs[b["index"]]) for b in take(train(data, num_epochs=2), 12)]
  assert np.mean(spreads) < np.mean(unsorted)
  assert [b["index"].tolist() for b in batches[:6]] != [b["index"].tolist() for b in batches[6:]]


def test_sorted_global_batches_do_not_depend_on_the_number_of_processes(data):
  costs = np.random.default_rng(0).integers(0, 100, 24)
  one = take(sorted_train(data, costs, batch_size=8, num_epochs=None), 4)
  shares = [take(sorted_train(data, costs, batch_size=2, process_index=p, process_count=4), 4)
            for p in range(4)]
  for k in range(4):
    rows = np.concatenate([shares[p][k]["index"] for p in range(4)])
    np.testing.assert_array_equal(rows, one[k]["index"])


def test_a_restored_sorted_iterator_continues_with_exactly_the_same_batches(data):
  costs = np.random.default_rng(1).integers(0, 100, 24)
  iterator = iter(sorted_train(data, costs))
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(5)]
  resumed = iter(sorted_train(data, costs))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["index"], want["index"])


def test_prefetch_is_bounded_and_checked(data):
  with pytest.raises(ValueError, match="prefetch=0"):
    train(data, prefetch=0)
  with pytest.raises(ValueError, match="batch_size=0"):
    train(data, batch_size=0)


def test_bad_records_are_counted_or_fatal(tmp_path, caplog):
  shard = tmp_path / "bad.tfrecord-00000-of-00001"
  good = video.encode_jpeg(np.zeros((40, 40, 3), np.uint8))
  with tfrecord.ShardWriter(shard) as writer:
    writer.write(dmvr.serialize(dmvr.VideoRecord([good] * 6, 1)))
    writer.write(dmvr.serialize(dmvr.VideoRecord([good[:100]] * 6, 2)))  # corrupt JPEGs
    writer.write(b"not a protobuf at all")
    writer.write(dmvr.serialize(dmvr.VideoRecord([good] * 6, 3)))
  kw = {"mode": "eval", "sampling": SAMPLING, "batch_size": 4}
  (batch,) = list(input_pipeline.make_dataset(str(shard), **kw))
  assert batch["valid"].tolist() == [True, False, False, True]
  assert batch["error"].tolist() == [False, True, True, False]
  with pytest.raises(ValueError, match=r"bad.tfrecord-00000-of-00001: record at offset \d+"):
    list(input_pipeline.make_dataset(str(shard), strict=True, **kw))
  data = bytearray(shard.read_bytes())
  data[-10] ^= 1
  shard.write_bytes(bytes(data))
  (batch,) = list(input_pipeline.make_dataset(str(shard), **kw))
  assert batch["error"].tolist() == [False, True, True, True]
  offset = int(tfrecord.read_index(shard)[3, 0])
  assert f"{shard}: CRC mismatch in the record at offset {offset}" in caplog.text


def test_missing_shards_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    input_pipeline.make_dataset(str(tmp_path / "nothing-here-*"), mode="train",
                                sampling=SAMPLING, batch_size=2)


def test_an_empty_shard_in_a_complete_set_is_refused(data, tmp_path):
  """A 0-byte shard among its -of-N siblings would silently drop its share of the data."""
  for shard in input_pipeline.list_shards(str(data / "train.tfrecord-*")):
    shutil.copy(shard, tmp_path / shard.name)
  (tmp_path / "train.tfrecord-00001-of-00003").write_bytes(b"")
  with pytest.raises(ValueError, match="00001-of-00003: holds no records"):
    input_pipeline.num_examples(str(tmp_path / "train.tfrecord-*"))
