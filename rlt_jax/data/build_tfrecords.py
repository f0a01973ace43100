"""Kinetics / Something-Something v2 / "path label" lists → DMVR-layout TFRecord shards.

    python data/build_tfrecords.py --format kinetics --annotations kinetics400/train.csv \
        --video_dir kinetics400/train --output_dir /data/k400 --split train --workers 16

Writes `{split}.tfrecord-SSSSS-of-NNNNN` shards (each with an offset index in `.rlt_index/`),
`classes.txt` (one class name per line, line number = label) and `{split}.summary.json`
(counts, every skipped video with the reason, and `complete`, true only once every shard is
written). Frames: RGB, short side resized to 256, JPEG at quality 90, at the source frame rate
unless --fps is given (stored in `clip/frame_rate`). Videos are shuffled (fixed seed) before
sharding so every shard mixes classes. A shard is written under a hidden temporary name and
renamed when complete; running the same command again skips finished shards, so an interrupted
conversion resumes. A rerun whose videos, labels, class list, shard count or encoding differ
is refused (it would mix two datasets): use a fresh --output_dir or --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys

import numpy as np
import tqdm
from absl import logging

from rlt_jax.data import dmvr, tfrecord, video
from rlt_jax.runtime import files


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str        # the video file ('' when it was not found)
  label: int       # -1 when unlabelled (test splits)
  text: str
  video_id: str
  start_us: int | None = None
  end_us: int | None = None
  where: str = dataclasses.field(default="", compare=False)  # "FILE:LINE", for messages


class AnnotationError(ValueError):
  pass


def _read_text(path: str, what: str) -> str:
  """The file as UTF-8 text; anything else is an error naming the line, before any work."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - data.rfind(b"\n", 0, e.start)
    raise AnnotationError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not "
                          f"UTF-8; expected {what} in UTF-8") from None


def _index_videos(video_dir: str) -> dict[str, str]:
  """File stem → path, over video_dir and its sub-folders (Kinetics keeps one per class)."""
  found = {}
  for root, _, names in os.walk(video_dir):
    for name in names:
      found.setdefault(os.path.splitext(name)[0], os.path.join(root, name))
  return found


def _class_list(names: list[str], output_dir: str, classes_file: str | None) -> list[str]:
  """The class list: --classes, else the output's existing classes.txt, else sorted names."""
  path = classes_file or os.path.join(output_dir, tfrecord.CLASSES_FILE)
  if classes_file or os.path.exists(path):
    return _read_classes(path)
  return sorted(set(names))


def _read_classes(path: str) -> list[str]:
  return [line for line in _read_text(path, "one class name per line").splitlines()
          if line.strip()]


def _label(name: str, classes: list[str], where: str) -> int:
  try:
    return classes.index(name)
  except ValueError:
    raise AnnotationError(f"{where}: label {name!r} is not in the class list "
                          f"({len(classes)} classes)") from None


def read_kinetics(annotations: str, video_dir: str, output_dir: str,
                  classes_file: str | None) -> tuple[list[Entry], list[str]]:
  reader = csv.DictReader(io.StringIO(_read_text(annotations, "a Kinetics CSV"), newline=""))
  columns = "label,youtube_id,time_start,time_end,split"
  need = {"youtube_id", "time_start", "time_end"}
  if not need <= set(reader.fieldnames or ()):
    raise AnnotationError(f"{annotations}:1: expected a Kinetics CSV header with columns "
                          f"{columns} (label and split optional), got {reader.fieldnames}")
  labelled = "label" in reader.fieldnames
  rows = []
  for row in reader:
    where = f"{annotations}:{reader.line_num}"
    extra, values = row.pop(None, []), [v for v in row.values() if v is not None]
    if extra or len(values) < len(reader.fieldnames):
      raise AnnotationError(f"{where}: expected {len(reader.fieldnames)} fields "
                            f"({','.join(reader.fieldnames)}), got {len(values) + len(extra)}")
    try:
      start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    except ValueError:
      raise AnnotationError(f"{where}: time_start/time_end must be numbers, got "
                            f"{row['time_start']!r}, {row['time_end']!r}") from None
    for column in ("youtube_id", "label") if labelled else ("youtube_id",):
      if not row[column].strip():
        raise AnnotationError(f"{where}: expected a {column}, got an empty field")
    rows.append((where, row, start, end))
  if not rows:
    raise AnnotationError(f"{annotations}: expected a Kinetics CSV with at least one video row")
  classes = _class_list([r["label"] for _, r, _, _ in rows] if labelled else [], output_dir,
                        classes_file)
  videos = _index_videos(video_dir)
  entries = []
  for where, row, start, end in rows:
    video_id = f"{row['youtube_id']}_{start:06d}_{end:06d}"
    text = row["label"] if labelled else ""
    label = _label(text, classes, where) if labelled else -1
    entries.append(Entry(videos.get(video_id, ""), label, text, video_id,
                         start * 1_000_000, end * 1_000_000, where))
  return entries, classes


def _read_json(path: str, what: str):
  try:
    return json.loads(_read_text(path, what))
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}:{e.lineno}: {e.msg} (column {e.colno}); expected {what}"
                          ) from None


def read_ssv2(annotations: str, video_dir: str, labels_file: str | None
              ) -> tuple[list[Entry], list[str]]:
  labels_file = labels_file or os.path.join(os.path.dirname(annotations), "labels.json")
  if not os.path.isfile(labels_file):
    raise AnnotationError(f"{labels_file}: no such file; expected SSv2's labels.json (or pass "
                          "--labels)")
  label_map = _read_json(labels_file, "SSv2's labels.json, {template: index}")
  try:
    label_map = {str(k): int(v) for k, v in label_map.items()}
  except (AttributeError, TypeError, ValueError):
    label_map = None
  if not label_map or sorted(label_map.values()) != list(range(len(label_map))):
    raise AnnotationError(f"{labels_file}: expected {{template: index}} with each index from 0 "
                          "to the number of templates - 1 once")
  classes = sorted(label_map, key=label_map.get)
  items = _read_json(annotations, "an SSv2 list of {id, template}")
  if not isinstance(items, list):
    raise AnnotationError(f"{annotations}: expected an SSv2 list of {{id, template}}, got a "
                          f"{type(items).__name__}")
  videos = _index_videos(video_dir)
  entries = []
  for i, item in enumerate(items):
    where = f"{annotations}: item {i}"
    if not isinstance(item, dict) or "id" not in item:
      raise AnnotationError(f"{where}: expected {{id, template}}, got {str(item)[:80]}")
    text = str(item.get("template", "")).replace("[", "").replace("]", "")
    if text and text not in label_map:
      raise AnnotationError(f"{where} (id {item['id']}): template {text!r} is not in "
                            f"{labels_file}")
    entries.append(Entry(videos.get(str(item["id"]), ""), label_map.get(text, -1), text,
                         str(item["id"]), where=where))
  return entries, classes


def read_list(annotations: str, video_dir: str, classes_file: str | None
              ) -> tuple[list[Entry], list[str]]:
  classes = _read_classes(classes_file) if classes_file else []
  entries = []
  for line, text in enumerate(_read_text(annotations, "'PATH LABEL' lines").splitlines(), 1):
    if not text.strip():
      continue
    where = f"{annotations}:{line}"
    parts = text.rsplit(maxsplit=1)
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
      raise AnnotationError(f"{where}: expected 'PATH LABEL' with an integer label, got "
                            f"{text.strip()!r}")
    path, label = os.path.join(video_dir, parts[0]), int(parts[1])
    if classes and not 0 <= label < len(classes):
      raise AnnotationError(f"{where}: label {label} is outside the {len(classes)} classes of "
                            f"{classes_file}")
    entries.append(Entry(path if os.path.exists(path) else "", label,
                         classes[label] if classes else str(label),
                         os.path.splitext(os.path.basename(parts[0]))[0], where=where))
  if not classes:
    classes = [str(i) for i in range(max((e.label for e in entries), default=-1) + 1)]
  return entries, classes


@dataclasses.dataclass(frozen=True)
class Encoding:
  short_side: int = 256
  fps: float | None = None
  quality: int = 90
  min_frames: int = 16


def encode(entry: Entry, encoding: Encoding) -> tuple[bytes | None, str]:
  """(serialized record, '') or (None, why it was skipped). Never raises for a bad video."""
  if not entry.path:
    return None, "video file not found"
  try:
    jpegs, rate = [], 0.0
    for frame, rate in video.iterate_frames(entry.path, fps=encoding.fps):
      shape = video.short_side_shape(*frame.shape[:2], encoding.short_side)
      jpegs.append(video.encode_jpeg(video.resize(frame, shape), encoding.quality))
  except Exception as e:  # a corrupt file can fail anywhere in a decoder; never stop the run
    return None, str(e) if isinstance(e, video.VideoError) else f"{type(e).__name__}: {e}"
  if len(jpegs) < encoding.min_frames:
    return None, f"too short: {len(jpegs)} frames (--min_frames {encoding.min_frames})"
  return dmvr.serialize(dmvr.VideoRecord(jpegs, entry.label, entry.text, entry.video_id, rate,
                                         entry.start_us, entry.end_us)), ""


def _encode_job(job):
  return encode(*job)


def shard_path(output_dir: str, split: str, shard: int, num_shards: int) -> str:
  return os.path.join(output_dir, f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}")


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _manifest(entries: list[Entry]) -> str:
  """Every value a shard's records take from the annotations, hashed: what a resume must match."""
  return _digest([[e.video_id, e.label, e.text, e.start_us, e.end_us] for e in entries])


def unique_entries(entries: list[Entry]) -> list[Entry]:
  """The entries with exact repeats of a video dropped (a warning counts them); a video listed
  again with other values (label, path, times) is an AnnotationError, since either could be
  wrong."""
  first: dict[str, Entry] = {}
  repeats, conflicts = [], []
  for entry in entries:
    seen = first.setdefault(entry.video_id, entry)
    if seen is not entry:
      (repeats if seen == entry else conflicts).append((seen, entry))
  fields = ("label", "text", "path", "start_us", "end_us")
  if conflicts:
    examples = "; ".join(
        f"{a.video_id!r} at {a.where} and {b.where}: " + ", ".join(
            f"{f} {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in fields
            if getattr(a, f) != getattr(b, f)) for a, b in conflicts[:3])
    raise AnnotationError(f"videos listed again with other values: {len(conflicts)} ("
                          f"{examples}{'; ...' if len(conflicts) > 3 else ''})")
  if repeats:
    logging.warning("videos listed again with the same label: %d; dropping the repeats (%s%s)",
                    len(repeats), ", ".join(f"{b.video_id!r} at {b.where} (first at {a.where})"
                                            for a, b in repeats[:3]),
                    ", ..." if len(repeats) > 3 else "")
  return list(first.values())


def _plan_difference(old: dict, new: dict, output_dir: str, split: str) -> str | None:
  """How an existing conversion's plan differs from this one's, or None."""
  if old.get("version") != new["version"]:
    return "it was started by an older version of this converter"
  for key, what in (("num_shards", "shard count"), ("encoding", "encoding options"),
                    ("classes", "class list")):
    if old[key] != new[key]:
      return f"its {what} differs" + (f" ({old[key]}, now {new[key]})" if key != "classes" else "")
  names = [os.path.basename(shard_path(output_dir, split, s, new["num_shards"]))
           for s, (a, b) in enumerate(zip(old["shards"], new["shards"])) if a != b]
  if names:
    return (f"the videos or labels of {len(names)} of its shards differ: "
            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
  return None


def _discard(output_dir: str, split: str, progress_dir: str) -> None:
  """Removes this split's shards, indices, build state and summary (--overwrite)."""
  for folder in (output_dir, os.path.join(output_dir, tfrecord.INDEX_DIR)):
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
      if name.startswith(f"{split}.tfrecord-"):
        os.remove(os.path.join(folder, name))
  for name in os.listdir(progress_dir):
    if name != ".lock":
      os.remove(os.path.join(progress_dir, name))
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(output_dir, f"{split}.summary.json"))


def _remove_temporaries(output_dir: str, split: str) -> None:
  """Half-written shards and indices of killed runs: each has its own name, so they pile up."""
  for folder in (output_dir, os.path.join(output_dir, tfrecord.INDEX_DIR)):
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
      if name.startswith(f".{split}.tfrecord-") and name.endswith(".tmp"):
        os.remove(os.path.join(folder, name))


def build(entries: list[Entry], classes: list[str], *, output_dir: str, split: str,
          num_shards: int | None = None, workers: int = 1, encoding: Encoding = Encoding(),
          seed: int = 0, overwrite: bool = False) -> dict:
  """Writes the shards (skipping finished ones), classes.txt and the summary; returns it.

  An existing conversion of `split` in `output_dir` is resumed only if every value it writes
  (videos, labels, class names, shard count, encoding) is the same, so a rerun never mixes two
  datasets; `overwrite` discards it instead. One conversion per split at a time (a lock).
  """
  if not entries:
    raise AnnotationError("the annotations list no videos")
  entries = unique_entries(entries)
  num_shards = num_shards or math.ceil(len(entries) / 64)
  if not 1 <= num_shards <= len(entries):
    raise AnnotationError(f"--num_shards {num_shards}: expected 1 to {len(entries)} "
                          f"(the number of videos)")
  order = np.random.RandomState(seed).permutation(len(entries))
  shards = np.array_split(order, num_shards)
  plan = {"version": 2, "num_shards": num_shards, "encoding": dataclasses.asdict(encoding),
          "classes": _digest(classes),
          "shards": [_manifest([entries[i] for i in ids]) for ids in shards]}
  os.makedirs(output_dir, exist_ok=True)
  progress_dir = os.path.join(output_dir, f".{split}.progress")
  os.makedirs(progress_dir, exist_ok=True)
  with contextlib.ExitStack() as stack:
    try:
      stack.enter_context(files.workdir_lock(progress_dir))
    except files.WorkdirLocked:
      raise AnnotationError(f"{output_dir}: another conversion of '{split}' is running there; "
                            "wait for it to finish") from None
    if overwrite:
      _discard(output_dir, split, progress_dir)
    plan_file = os.path.join(progress_dir, "plan.json")
    if os.path.exists(plan_file):
      with open(plan_file) as f:
        if difference := _plan_difference(json.load(f), plan, output_dir, split):
          raise AnnotationError(
              f"{output_dir}: holds a '{split}' conversion that differs from this one ("
              f"{difference}); rerun it with the same annotations and options to resume, or "
              "use a fresh --output_dir, or --overwrite to discard it")
    classes_file = os.path.join(output_dir, tfrecord.CLASSES_FILE)
    if os.path.exists(classes_file) and (old := _read_classes(classes_file)) != classes:
      line = next((i for i, (a, b) in enumerate(zip(old, classes)) if a != b),
                  min(len(old), len(classes)))
      raise AnnotationError(
          f"{classes_file}:{line + 1}: lists other classes than this conversion ("
          f"{old[line] if line < len(old) else 'the end'!r} vs "
          f"{classes[line] if line < len(classes) else 'the end'!r}); every split in "
          f"{output_dir} shares it: use a fresh --output_dir, or delete it and convert every "
          "split again")
    files.write_json(plan_file, plan)
    if not os.path.exists(classes_file):
      with files.atomic_write(classes_file) as f:
        f.write("".join(f"{c}\n" for c in classes))
    summary_file = os.path.join(output_dir, f"{split}.summary.json")
    files.write_json(summary_file, {"split": split, "videos": len(entries), "shards": num_shards,
                                "classes": len(classes), "complete": False})
    _remove_temporaries(output_dir, split)
    converted = _write_shards(entries, shards, output_dir, split, progress_dir, workers,
                              encoding)

    summary = {"split": split, "videos": len(entries), "written": 0, "skipped": [],
               "shards": num_shards, "classes": len(classes), "converted_now": converted}
    for s in range(num_shards):
      with open(os.path.join(progress_dir, f"{s:05d}.json")) as f:
        report = json.load(f)
      summary["written"] += report["written"]
      summary["skipped"] += report["skipped"]
    summary["skipped_count"] = len(summary["skipped"])
    summary["complete"] = True
    files.write_json(summary_file, summary)  # last: readers check it says complete
  return summary


def _write_shards(entries: list[Entry], shards: list[np.ndarray], output_dir: str, split: str,
                  progress_dir: str, workers: int, encoding: Encoding) -> int:
  """Converts the shards not finished yet, each with a progress file written after it;
  returns how many videos this call converted (0: an earlier run had done them all)."""
  num_shards = len(shards)
  done = lambda s: all(os.path.exists(p) for p in (
      shard_path(output_dir, split, s, num_shards),
      str(tfrecord.index_path(shard_path(output_dir, split, s, num_shards))),
      os.path.join(progress_dir, f"{s:05d}.json")))
  todo = [s for s in range(num_shards) if not done(s)]
  jobs = [(entries[i], encoding) for s in todo for i in shards[s]]
  # forkserver, not fork: a fork of a process whose threads (jax, grain, tqdm) hold locks can
  # deadlock in the child
  pool = (multiprocessing.get_context("forkserver").Pool(workers) if workers > 1 and jobs
          else None)
  results = pool.imap(_encode_job, jobs) if pool else map(_encode_job, jobs)
  bar = tqdm.tqdm(total=len(entries), initial=len(entries) - len(jobs), unit="video",
                  desc=split, disable=None)
  try:
    for s in todo:
      skipped = []
      with tfrecord.ShardWriter(shard_path(output_dir, split, s, num_shards)) as writer:
        for i in shards[s]:
          payload, why = next(results)
          if payload is None:
            skipped.append({"video": entries[i].video_id, "path": entries[i].path,
                            "reason": why})
          else:
            writer.write(payload)
          bar.update()
        files.write_json(os.path.join(progress_dir, f"{s:05d}.json"),
                     {"written": len(shards[s]) - len(skipped), "skipped": skipped})
  finally:
    bar.close()
    if pool:
      pool.terminate()
  return len(jobs)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python data/build_tfrecords.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--format", choices=("kinetics", "ssv2", "list"), required=True)
  parser.add_argument("--annotations", required=True,
                      help="Kinetics CSV, SSv2 train/validation JSON, or a 'PATH LABEL' list")
  parser.add_argument("--video_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--split", required=True, help="shard name prefix, e.g. train")
  parser.add_argument("--num_shards", type=int, help="default: one per 64 videos")
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--short_side", type=int, default=256)
  parser.add_argument("--fps", type=float, help="resample to this frame rate (default: source)")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
  parser.add_argument("--min_frames", type=int, default=16,
                      help="skip videos with fewer frames than this")
  parser.add_argument("--classes", help="class names, one per line (kinetics, list)")
  parser.add_argument("--labels", help="SSv2 labels.json (default: next to --annotations)")
  parser.add_argument("--seed", type=int, default=0, help="shuffle before sharding")
  parser.add_argument("--overwrite", action="store_true",
                      help="discard an existing conversion of --split in --output_dir (its "
                           "shards, indices, progress and summary) instead of resuming it")
  args = parser.parse_args(argv)
  try:
    for name in ("annotations", "classes", "labels"):
      if getattr(args, name) is not None and not os.path.isfile(getattr(args, name)):
        raise AnnotationError(f"--{name} {getattr(args, name)}: no such file")
    if not os.path.isdir(args.video_dir):
      raise AnnotationError(f"--video_dir {args.video_dir}: no such directory (expected the "
                            "folder holding the videos)")
    if args.format == "kinetics":
      entries, classes = read_kinetics(args.annotations, args.video_dir, args.output_dir,
                                       args.classes)
    elif args.format == "ssv2":
      entries, classes = read_ssv2(args.annotations, args.video_dir, args.labels)
    else:  # like Kinetics, a second split reuses the first split's classes.txt
      existing = os.path.join(args.output_dir, tfrecord.CLASSES_FILE)
      entries, classes = read_list(args.annotations, args.video_dir, args.classes or (
          existing if os.path.exists(existing) else None))
    summary = build(entries, classes, output_dir=args.output_dir, split=args.split,
                    num_shards=args.num_shards, workers=args.workers,
                    encoding=Encoding(args.short_side, args.fps, args.quality, args.min_frames),
                    seed=args.seed, overwrite=args.overwrite)
  except (AnnotationError, OSError) as e:
    sys.exit(f"error: {e}")
  done = (f"{summary['written']} of {summary['videos']} videos in {summary['shards']} shards "
          f"in {args.output_dir}; {summary['skipped_count']} skipped (listed in "
          f"{args.split}.summary.json)")
  if summary["converted_now"] == 0:
    print(f"{args.split}: already complete, nothing to do: {done}")
  elif summary["converted_now"] < summary["videos"]:
    print(f"{args.split}: resumed, {summary['converted_now']} videos converted now; {done}")
  else:
    print(f"{args.split}: {done.replace(' videos in', ' videos written to', 1)}")


if __name__ == "__main__":
  main()
