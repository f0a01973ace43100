"""The grain input pipeline: DMVR TFRecord shards → batches of uint8 clips for one process.

Random access through each shard's offset index gives a true global shuffle (`grain.MapDataset`),
a new order every epoch, and an iterator whose state (a few integers) goes into the training
checkpoint: a resumed run sees exactly the batches an uninterrupted one would have. Every
process walks the same shuffled stream and reads only its rows of each global batch, so each
example is read by exactly one process, and the global batches do not depend on the number of
processes. Frames stay uint8 (normalisation runs on device, with 4×
less to transfer); only the JPEGs a clip needs are decoded.

A record that fails (CRC mismatch, bad protobuf, corrupt JPEG) becomes an example with
`valid = False` and `error = True`, so batch shapes and the iterator state stay deterministic; the
trainer weights it out and logs the count. With `strict=True` it raises instead, naming the shard
and offset.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sys
import threading
from typing import Callable

import grain
import numpy as np
from absl import flags, logging
from etils import epath
from PIL import Image

from rlt_jax.data import dmvr, tfrecord, video
from rlt_jax.runtime import files

MODES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How clips are cut from a video. Defaults: the release's Kinetics recipe."""
  num_frames: int = 16
  stride: int = 4                # in source frames
  source_fps: float | None = None  # if set, stride is in frames at this rate (see _stride)
  image_size: int = 224
  flip: bool = True              # never for Something-Something v2
  min_area: float = 0.5
  max_area: float = 1.0
  min_ratio: float = 3 / 4
  max_ratio: float = 4 / 3
  views: tuple[int, int] = (1, 1)  # evaluation: clips × crops per video


def list_shards(patterns: str) -> list[epath.Path]:
  """Shards matching comma-separated globs; an incomplete `-of-N` set or build is refused."""
  return tfrecord.list_shards(patterns)


class RecordSource:
  """Random access to every record of a set of shards: `source[i]` → (i, shard, offset, bytes)."""

  def __init__(self, shards: list[epath.Path]):
    self.shards = [str(s) for s in shards]
    indices = [tfrecord.read_index(s) for s in shards]
    if empty := [s for s, index in zip(self.shards, indices) if len(index) == 0]:
      more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
      raise ValueError(f"{empty[0]}{more}: holds no records, so its share of the data would be "
                       "silently missing (a truncated or unfinished copy?); copy or rebuild it, "
                       "or leave it out of the pattern")
    self._shard = np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(indices)])
    self._offsets = np.concatenate(indices)
    self._local = threading.local()  # grain reads from several threads: a handle per thread

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> tuple[int, str, int, bytes]:
    shard = int(self._shard[i])
    offset, length = (int(v) for v in self._offsets[i])
    files = self._local.__dict__.setdefault("files", {})
    if shard not in files:
      files[shard] = epath.Path(self.shards[shard]).open("rb")
    f = files[shard]
    f.seek(offset)
    return int(i), self.shards[shard], offset, f.read(length)

  def __getstate__(self):  # open files stay in the process that opened them
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state):
    self.__dict__.update(state, _local=threading.local())


def _stride(sampling: Sampling, frame_rate: float) -> float:
  """The stride in stored frames: records at another rate than `source_fps` are rescaled."""
  if sampling.source_fps and frame_rate:
    return sampling.stride * frame_rate / sampling.source_fps
  return float(sampling.stride)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            sampling: Sampling) -> tuple[int, int, int, int]:
  """(top, left, h, w) with area and aspect ratio drawn as torchvision does (10 tries)."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(sampling.min_area, sampling.max_area)
    ratio = math.exp(rng.uniform(math.log(sampling.min_ratio), math.log(sampling.max_ratio)))
    w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  side = min(height, width)  # fall back to a centre crop
  return (height - side) // 2, (width - side) // 2, side, side


def _decode(record: dmvr.VideoRecord, indices: np.ndarray) -> list[np.ndarray]:
  cache = {i: video.decode_jpeg(record.jpegs[i]) for i in np.unique(indices)}
  return [cache[i] for i in indices]


def train_clip(record: dmvr.VideoRecord, rng: np.random.Generator,
               sampling: Sampling) -> np.ndarray:
  """A random window, a random resized crop (same for all frames), a random flip."""
  n, stride = len(record.jpegs), _stride(sampling, record.frame_rate)
  span = (sampling.num_frames - 1) * stride + 1
  start = rng.uniform(0, max(n - span, 0))
  frames = _decode(record, video.clip_indices(n, start, sampling.num_frames, stride))
  top, left, h, w = random_resized_crop_box(rng, *frames[0].shape[:2], sampling)
  size = (sampling.image_size, sampling.image_size)
  if (top, left, h, w) == (0, 0, *size) == (0, 0, *frames[0].shape[:2]):
    clip = np.stack(frames)  # the whole frame at its own size: nothing to resample
  else:
    clip = np.stack([np.asarray(Image.fromarray(f).resize(
        size, Image.BILINEAR, box=(left, top, left + w, top + h))) for f in frames])
  if sampling.flip and rng.random() < 0.5:
    clip = clip[:, :, ::-1]
  return np.ascontiguousarray(clip)


def eval_clip(record: dmvr.VideoRecord, view: int, sampling: Sampling) -> np.ndarray:
  """View `view` of the deterministic clips × crops grid (1 × 1: the centre clip and crop)."""
  clips, crops = sampling.views
  n, stride = len(record.jpegs), _stride(sampling, record.frame_rate)
  start = video.test_clip_starts(n, clips=clips, clip_len=sampling.num_frames,
                                 stride=stride)[view // crops]
  frames = _decode(record, video.clip_indices(n, start, sampling.num_frames, stride))
  shape = video.short_side_shape(*frames[0].shape[:2], sampling.image_size)
  offset = video.crop_offsets(max(shape), sampling.image_size, crops)[view % crops]
  return np.stack([video.crop_long_side(video.resize(f, shape), offset, sampling.image_size)
                   for f in frames])


Cost = Callable[[np.ndarray], int]  # a clip (T, H, W, 3) → what it costs to run (e.g. tokens)


def _example(clip: np.ndarray, label: int, index: int, view: int, valid: bool, error: bool,
             cost: Cost | None) -> dict[str, np.ndarray]:
  example = {"frames": clip, "label": np.int32(label), "index": np.int32(index),
             "view": np.int32(view), "valid": np.bool_(valid), "error": np.bool_(error)}
  if cost is not None:
    example["cost"] = np.int32(cost(clip))
  return example


class BadRecordError(ValueError):
  """A record that cannot be read, with `strict=True`; the message names shard and offset."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """One (record, view) → one example; failures become invalid examples unless strict. With a
  `cost` (picklable: workers run it), examples also carry "cost", e.g. the tokens RLT keeps."""
  sampling: Sampling
  mode: str
  strict: bool = False
  cost: Cost | None = None

  def __call__(self, item, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    (index, shard, offset, data), view = (item, 0) if self.mode == "train" else item
    s = self.sampling
    if data is None:  # padding to whole batches in evaluation
      blank = np.zeros((s.num_frames, s.image_size, s.image_size, 3), np.uint8)
      return _example(blank, -1, -1, 0, False, False, self.cost)
    try:
      record = dmvr.parse(tfrecord.unframe(shard, offset, data))
      clip = (train_clip(record, rng, s) if self.mode == "train"
              else eval_clip(record, view, s))
    except Exception as e:  # corrupt data of any kind; counted unless strict
      message = f"{shard}: record at offset {offset}: {type(e).__name__}: {e}"
      if self.strict:
        raise BadRecordError(f"{message} (config.data.strict stops at the first bad record)"
                             ) from e
      logging.warning("skipping a bad record: %s", message)
      blank = np.zeros((s.num_frames, s.image_size, s.image_size, 3), np.uint8)
      return _example(blank, -1, index, view, False, True, self.cost)
    return _example(clip, record.label, index, view, True, False, self.cost)


class _ProcessShare(grain.MapDataset):
  """This process's rows of every global batch: global batch k is elements kB … kB + B − 1 of
  the shuffled stream, and process p takes rows pb … pb + b − 1 of it (b = B / P). So the
  global batches, their row order and every example's augmentation (seeded by its position in
  the global stream) are the same for any number of processes. A last partial global batch
  (fewer than B examples, finite runs only) is dropped."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._b, self._p, self._count = batch_size, process_index, process_count

  def __len__(self) -> int:
    return len(self._parent) // (self._b * self._count) * self._b

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    row = (j // self._b) * self._b * self._count + self._p * self._b + j % self._b
    return self._parent[row]

  def __str__(self) -> str:
    return f"ProcessShare(batch={self._b}, process={self._p}/{self._count})"


class _Views:
  """(record, view) pairs for this process's evaluation share, padded to whole batches.

  Every process gets the same number of batches (collectives stay in step); padding entries
  carry no data.
  """

  def __init__(self, source: RecordSource, views: int, process_index: int, process_count: int,
               batch_size: int):
    self.source, self.views = source, views
    self.process_index, self.process_count = process_index, process_count
    self.total = len(source) * views
    per_process = math.ceil(self.total / process_count)
    self.length = math.ceil(per_process / batch_size) * batch_size

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, j: int):
    g = self.process_index + j * self.process_count
    if g >= self.total:
      return (-1, "", 0, None), 0
    return self.source[g // self.views], g % self.views


class _Order(grain.MapDataset):
  """Record order for training: epoch e is a shuffle of the records, seeded by (seed, e).

  With per-record costs (kept-token counts), every window of W global batches of that shuffle
  is sorted by cost, cut into W batches and the batches shuffled: clips of one batch then keep
  similar token counts, so the layout's static shapes fit them tightly. A pure function of the
  position, so the iterator state stays a few integers (exact resume), every record is seen
  once per epoch (a last partial batch is dropped), and no process count enters it.
  """

  def __init__(self, parent: grain.MapDataset, *, batch_size: int, seed: int,
               num_epochs: int | None, costs: np.ndarray | None = None, window: int = 0):
    super().__init__(parent)
    self._n, self._batch, self._seed = len(parent), batch_size, seed
    self._per_epoch = self._n // batch_size * batch_size
    self._epochs, self._costs, self._window = num_epochs, costs, window
    self._cache: dict[tuple[int, int], np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize if self._epochs is None else self._epochs * self._per_epoch

  def _epoch(self, epoch: int) -> np.ndarray:
    key = (epoch, -1)
    if key not in self._cache:
      self._cache = {k: v for k, v in self._cache.items() if k[0] == epoch}
      self._cache[key] = np.random.default_rng([self._seed, epoch]).permutation(self._n)
    return self._cache[key]

  def _window_order(self, epoch: int, w: int) -> np.ndarray:
    span = self._window * self._batch
    if (epoch, w) not in self._cache:
      ids = self._epoch(epoch)[w * span:min((w + 1) * span, self._per_epoch)]
      ids = ids[np.argsort(self._costs[ids], kind="stable")].reshape(-1, self._batch)
      rng = np.random.default_rng([self._seed, epoch, w, 1])
      self._cache[(epoch, w)] = ids[rng.permutation(len(ids))].reshape(-1)
    return self._cache[(epoch, w)]

  def index(self, j: int) -> int:
    """The record at position j of the stream."""
    epoch, i = divmod(j, self._per_epoch)
    if self._costs is None or self._window <= 1:
      return int(self._epoch(epoch)[i])
    w, k = divmod(i, self._window * self._batch)
    return int(self._window_order(epoch, w)[k])

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    return self._parent[self.index(j)]

  def __str__(self) -> str:
    return f"Order(batch={self._batch}, window={self._window}, sorted={self._costs is not None})"


def record_costs(patterns: str, sampling: Sampling, cost: Cost, *,
                 cache_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, strict: bool = False) -> np.ndarray:
  """`cost` of each record's centre clip: the sort key of training.

  Decodes one clip per record once; cached in `cache_dir` (keyed by shards, sampling and the
  cost's repr, so give it a stable one, e.g. a dataclass). With several processes each
  computes a share and all gather the whole array.
  """
  source = open_source(patterns)
  key = hashlib.sha256(repr((source.shards, len(source), sampling, cost)).encode()
                       ).hexdigest()[:16]
  path = os.path.join(cache_dir, f"record_costs_{key}.npy") if cache_dir else None
  if path and os.path.exists(path):
    costs = np.load(path, allow_pickle=False)
    if costs.shape == (len(source),):
      return costs
  centre = dataclasses.replace(sampling, views=(1, 1))
  share = np.arange(process_index, len(source), process_count)
  ds = grain.MapDataset.source(_Views(source, 1, process_index, process_count, 1))
  ds = ds.map(Transform(centre, "eval", strict, cost)).to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=64))
  mine = np.asarray([int(e["cost"]) for e, _ in zip(ds, share)], np.int32)
  if process_count > 1:
    # imported here: decoding workers import this module, and only this path needs jax
    from jax.experimental import multihost_utils
    width = -(-len(source) // process_count)
    padded = np.full(width, -1, np.int32)
    padded[:len(mine)] = mine
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # (P, width)
    costs = gathered.T.reshape(-1)[:len(source)]
  else:
    costs = mine
  if path and process_index == 0:
    os.makedirs(cache_dir, exist_ok=True)
    with files.atomic_write(path, "wb") as f:
      np.save(f, costs)
  return costs


def _mark_flags_parsed() -> None:
  """grain's multiprocessing reads absl flags; a library caller may not have parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(patterns: str, *, mode: str, sampling: Sampling, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 workers: int = 0, strict: bool = False, prefetch: int = 2,
                 costs: np.ndarray | None = None, sort_window: int = 0,
                 cost: Cost | None = None) -> grain.IterDataset:
  """This process's batches (`batch_size` is per process) of dicts of numpy arrays.

  With `cost`, every example also carries "cost" (the caller's measure of a clip, e.g. the
  tokens RLT keeps; the pipeline knows nothing of models). Train: shuffled anew every epoch
  (and, given per-record `costs`, sorted by cost within
  windows of `sort_window` global batches), repeated `num_epochs` times (None: forever), whole
  batches only. Eval: every (record, view) once, in order, padded with `valid = False`
  examples to whole batches and to the same batch count on every process. At most about
  `prefetch` batches are decoded ahead (host memory: prefetch × batch × clip bytes).
  """
  if mode not in MODES:
    raise ValueError(f"mode {mode!r}: expected one of {MODES}")
  for name, value in (("batch_size", batch_size), ("prefetch", prefetch)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}: expected a positive integer")
  source = open_source(patterns)  # refuses a pattern that matches nothing and empty shards
  transform = Transform(sampling, mode, strict, cost)
  if mode == "train":
    global_batch = batch_size * process_count
    if len(source) < global_batch:
      raise ValueError(f"{patterns}: {len(source)} records, fewer than one global batch of "
                       f"{global_batch}")
    ds = _Order(grain.MapDataset.source(source), batch_size=global_batch, seed=seed,
                num_epochs=num_epochs, costs=costs, window=sort_window)
    ds = _ProcessShare(ds.random_map(transform, seed=seed + 1), batch_size, process_index,
                       process_count)
  else:
    views = sampling.views[0] * sampling.views[1]
    ds = grain.MapDataset.source(_Views(source, views, process_index, process_count,
                                        batch_size)).map(transform)
  # threads beyond the host's cores only fight over the GIL
  read = grain.ReadOptions(num_threads=min(16, prefetch * batch_size, os.cpu_count() or 1),
                           prefetch_buffer_size=prefetch * batch_size)
  ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=mode == "train")
  if workers > 0:
    _mark_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def classes_path(patterns: str) -> epath.Path | None:
  """The classes.txt next to the first shard of a set, or None if there is none."""
  path = epath.Path(open_source(patterns).shards[0]).parent / tfrecord.CLASSES_FILE
  return path if path.exists() else None


def read_classes(patterns: str) -> list[str]:
  """The class names of a shard set (`classes_path`), or [] if there are none."""
  path = classes_path(patterns)
  return [line for line in path.read_text().splitlines() if line] if path else []


def order_by_cost(costs: np.ndarray) -> np.ndarray:
  """A permutation that puts clips of similar cost together (stable, ascending): batches cut
  from it hold clips that fit the same static shapes."""
  return np.argsort(np.asarray(costs), kind="stable")


class DataError(RuntimeError):
  """Too many bad records or labels to trust the data."""


class BatchCheck:
  """Host-side checks of each local training batch before it is used: labels outside
  [0, classes) are counted and weighted out (or stop the run when strict); too many bad
  records in the last ~20 batches stop the run, and `finish` checks a run too short for that,
  so an unreadable dataset never "trains" to the end."""

  def __init__(self, num_classes: int, max_bad_fraction: float, strict: bool):
    self.num_classes, self.limit, self.strict = num_classes, max_bad_fraction, strict
    self.recent: list[tuple[int, int]] = []
    self.bad_labels = self.bad_records = self.seen = 0

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    label, valid = batch["label"], batch["valid"].astype(bool)
    outside = valid & ((label < 0) | (label >= self.num_classes))
    if outside.any():
      if self.strict:
        raise DataError(f"labels {sorted(set(label[outside].tolist()))[:5]} are outside "
                        f"[0, {self.num_classes}) (config.data.strict)")
      self.bad_labels += int(outside.sum())
      batch = dict(batch, valid=valid & ~outside, label=np.where(outside, 0, label))
    errors = int(batch["error"].sum())
    self.bad_records += errors
    self.seen += len(label)
    self.recent = (self.recent + [(errors + int(outside.sum()), len(label))])[-20:]
    bad, seen = map(sum, zip(*self.recent))
    if seen >= 4 * len(label) and bad > self.limit * seen:
      raise DataError(f"{bad} of the last {seen} training records are unreadable or mislabelled "
                      f"(limit config.data.max_bad_fraction={self.limit}); the log names them")
    return batch

  def finish(self) -> None:
    """At the end of a run too short for the rolling check: the whole run's share."""
    bad = self.bad_records + self.bad_labels
    if self.seen and bad > self.limit * self.seen:
      raise DataError(f"{bad} of the {self.seen} training records read were unreadable or "
                      f"mislabelled (limit config.data.max_bad_fraction={self.limit}); the "
                      "log names them. The model was not exported")

  def totals(self) -> dict[str, int]:
    return {"bad_records": self.bad_records, "bad_labels": self.bad_labels}


def num_examples(patterns: str) -> int:
  return len(open_source(patterns))


@functools.lru_cache(maxsize=8)
def open_source(patterns: str) -> RecordSource:
  """The shards' RecordSource, built once per process: listing shards and reading their
  indices is I/O (hundreds of files on GCS), and training asks for the same split again at
  every evaluation."""
  return RecordSource(list_shards(patterns))

