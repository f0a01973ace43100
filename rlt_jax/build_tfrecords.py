"""Kinetics / Something-Something v2 / "path label" lists → DMVR-layout TFRecord shards.

    python data/build_tfrecords.py --format kinetics --annotations kinetics400/train.csv \
        --video_dir kinetics400/train --output_dir /data/k400 --split train --workers 16

Writes `{split}.tfrecord-SSSSS-of-NNNNN` shards (each with a `.index.npy` offset index),
`classes.txt` (one class name per line, line number = label) and `{split}.summary.json`
(counts, and every skipped video with the reason). Frames: RGB, short side resized to 256,
JPEG at quality 90, at the source frame rate unless --fps is given (stored in
`clip/frame_rate`). Videos are shuffled (fixed seed) before sharding so every shard mixes
classes. A shard is written under a hidden temporary name and renamed when complete; running
the same command again skips finished shards, so an interrupted conversion resumes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import sys

import numpy as np
import tqdm

from rlt_jax import dmvr, tfrecord, video


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str        # the video file ('' when it was not found)
  label: int       # -1 when unlabelled (test splits)
  text: str
  video_id: str
  start_us: int | None = None
  end_us: int | None = None


class AnnotationError(ValueError):
  pass


def _index_videos(video_dir: str) -> dict[str, str]:
  """File stem → path, over video_dir and its sub-folders (Kinetics keeps one per class)."""
  found = {}
  for root, _, files in os.walk(video_dir):
    for name in files:
      found.setdefault(os.path.splitext(name)[0], os.path.join(root, name))
  return found


def _class_list(names: list[str], output_dir: str, classes_file: str | None) -> list[str]:
  """The class list: --classes, else the output's existing classes.txt, else sorted names."""
  path = classes_file or os.path.join(output_dir, "classes.txt")
  if classes_file or os.path.exists(path):
    with open(path) as f:
      return [line.rstrip("\n") for line in f if line.strip()]
  return sorted(set(names))


def _label(name: str, classes: list[str], where: str) -> int:
  try:
    return classes.index(name)
  except ValueError:
    raise AnnotationError(f"{where}: label {name!r} is not in the class list "
                          f"({len(classes)} classes)") from None


def read_kinetics(annotations: str, video_dir: str, output_dir: str,
                  classes_file: str | None) -> tuple[list[Entry], list[str]]:
  with open(annotations, newline="") as f:
    rows = list(csv.DictReader(f))
  need = {"youtube_id", "time_start", "time_end"}
  if not rows or not need <= set(rows[0]):
    raise AnnotationError(f"{annotations}: expected a Kinetics CSV with columns "
                          f"label,youtube_id,time_start,time_end,split")
  labelled = "label" in rows[0]
  classes = _class_list([r["label"] for r in rows] if labelled else [], output_dir, classes_file)
  videos = _index_videos(video_dir)
  entries = []
  for line, row in enumerate(rows, 2):
    try:
      start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    except ValueError:
      raise AnnotationError(f"{annotations}:{line}: time_start/time_end must be numbers, got "
                            f"{row['time_start']!r}, {row['time_end']!r}") from None
    video_id = f"{row['youtube_id']}_{start:06d}_{end:06d}"
    text = row["label"] if labelled else ""
    label = _label(text, classes, f"{annotations}:{line}") if labelled else -1
    entries.append(Entry(videos.get(video_id, ""), label, text, video_id,
                         start * 1_000_000, end * 1_000_000))
  return entries, classes


def read_ssv2(annotations: str, video_dir: str, labels_file: str | None
              ) -> tuple[list[Entry], list[str]]:
  labels_file = labels_file or os.path.join(os.path.dirname(annotations), "labels.json")
  try:
    with open(labels_file) as f:
      label_map = {k: int(v) for k, v in json.load(f).items()}
    with open(annotations) as f:
      items = json.load(f)
  except (OSError, json.JSONDecodeError, ValueError, AttributeError) as e:
    raise AnnotationError(f"SSv2 annotations: {e} (expected labels.json as "
                          f"{{template: index}} and a list of {{id, template}})") from None
  classes = [""] * len(label_map)
  for name, index in label_map.items():
    classes[index] = name
  videos = _index_videos(video_dir)
  entries = []
  for i, item in enumerate(items):
    if not isinstance(item, dict) or "id" not in item:
      raise AnnotationError(f"{annotations}: item {i} has no 'id'")
    text = item.get("template", "").replace("[", "").replace("]", "")
    if text and text not in label_map:
      raise AnnotationError(f"{annotations}: item {i} (id {item['id']}): template {text!r} is "
                            f"not in {labels_file}")
    entries.append(Entry(videos.get(str(item["id"]), ""), label_map.get(text, -1), text,
                         str(item["id"])))
  return entries, classes


def read_list(annotations: str, video_dir: str, classes_file: str | None
              ) -> tuple[list[Entry], list[str]]:
  classes = _class_list([], "", classes_file) if classes_file else []
  entries = []
  with open(annotations) as f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue
      parts = text.rsplit(maxsplit=1)
      if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise AnnotationError(f"{annotations}:{line}: expected 'PATH LABEL' with an integer "
                              f"label, got {text.strip()!r}")
      path, label = os.path.join(video_dir, parts[0]), int(parts[1])
      if classes and not 0 <= label < len(classes):
        raise AnnotationError(f"{annotations}:{line}: label {label} is outside the "
                              f"{len(classes)} classes of {classes_file}")
      name = classes[label] if classes else str(label)
      entries.append(Entry(path if os.path.exists(path) else "", label, name,
                           os.path.splitext(os.path.basename(parts[0]))[0]))
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


def _atomic_json(path: str, value) -> None:
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def shard_path(output_dir: str, split: str, shard: int, num_shards: int) -> str:
  return os.path.join(output_dir, f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}")


def build(entries: list[Entry], classes: list[str], *, output_dir: str, split: str,
          num_shards: int | None = None, workers: int = 1, encoding: Encoding = Encoding(),
          seed: int = 0) -> dict:
  """Writes the shards (skipping finished ones), classes.txt and the summary; returns it."""
  if not entries:
    raise AnnotationError("the annotations list no videos")
  num_shards = num_shards or math.ceil(len(entries) / 64)
  if not 1 <= num_shards <= len(entries):
    raise AnnotationError(f"--num_shards {num_shards}: expected 1 to {len(entries)} "
                          f"(the number of videos)")
  os.makedirs(output_dir, exist_ok=True)
  progress_dir = os.path.join(output_dir, f".{split}.progress")
  os.makedirs(progress_dir, exist_ok=True)
  order = np.random.RandomState(seed).permutation(len(entries))
  plan = {"videos": [entries[i].video_id for i in order], "num_shards": num_shards,
          "encoding": dataclasses.asdict(encoding)}
  plan_file = os.path.join(progress_dir, "plan.json")
  if os.path.exists(plan_file):
    with open(plan_file) as f:
      if json.load(f) != plan:
        raise AnnotationError(
            f"{output_dir}: holds an unfinished '{split}' conversion with other videos, shard "
            f"count or encoding; use the same arguments to resume, or a new --output_dir")
  else:
    _atomic_json(plan_file, plan)
  classes_file = os.path.join(output_dir, "classes.txt")
  if not os.path.exists(classes_file):
    with open(classes_file + ".tmp", "w") as f:
      f.write("".join(f"{c}\n" for c in classes))
    os.replace(classes_file + ".tmp", classes_file)

  shards = np.array_split(order, num_shards)
  done = lambda s: all(os.path.exists(p) for p in (
      shard_path(output_dir, split, s, num_shards),
      str(tfrecord.index_path(shard_path(output_dir, split, s, num_shards))),
      os.path.join(progress_dir, f"{s:05d}.json")))
  todo = [s for s in range(num_shards) if not done(s)]
  jobs = [(entries[i], encoding) for s in todo for i in shards[s]]
  pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and jobs else None
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
        _atomic_json(os.path.join(progress_dir, f"{s:05d}.json"),
                     {"written": len(shards[s]) - len(skipped), "skipped": skipped})
  finally:
    bar.close()
    if pool:
      pool.terminate()

  summary = {"split": split, "videos": len(entries), "written": 0, "skipped": [],
             "shards": num_shards, "classes": len(classes)}
  for s in range(num_shards):
    with open(os.path.join(progress_dir, f"{s:05d}.json")) as f:
      report = json.load(f)
    summary["written"] += report["written"]
    summary["skipped"] += report["skipped"]
  summary["skipped_count"] = len(summary["skipped"])
  _atomic_json(os.path.join(output_dir, f"{split}.summary.json"), summary)
  return summary


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
  args = parser.parse_args(argv)
  try:
    for name in ("annotations", "video_dir"):
      if not os.path.exists(getattr(args, name)):
        raise AnnotationError(f"--{name} {getattr(args, name)}: no such file or directory")
    if args.format == "kinetics":
      entries, classes = read_kinetics(args.annotations, args.video_dir, args.output_dir,
                                       args.classes)
    elif args.format == "ssv2":
      entries, classes = read_ssv2(args.annotations, args.video_dir, args.labels)
    else:
      entries, classes = read_list(args.annotations, args.video_dir, args.classes)
    summary = build(entries, classes, output_dir=args.output_dir, split=args.split,
                    num_shards=args.num_shards, workers=args.workers,
                    encoding=Encoding(args.short_side, args.fps, args.quality, args.min_frames),
                    seed=args.seed)
  except (AnnotationError, OSError) as e:
    sys.exit(f"error: {e}")
  print(f"{args.split}: {summary['written']} of {summary['videos']} videos written to "
        f"{summary['shards']} shards in {args.output_dir}; {summary['skipped_count']} skipped "
        f"(listed in {args.split}.summary.json)")


if __name__ == "__main__":
  main()
