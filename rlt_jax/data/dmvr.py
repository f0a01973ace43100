"""The DMVR / MediaSequence SequenceExample layout of a video record, built and parsed without TF.

Context: `clip/label/index` (int64), `clip/label/text` (DMVR; `clip/label/string` is read too),
`video/filename` (the video id), `clip/frame_rate` (float, frames per second of the stored
frames), optional `clip/start/timestamp` / `clip/end/timestamp` (µs). Feature list
`image/encoded`: one JPEG per frame.
"""

from __future__ import annotations

import dataclasses

from tensorflow_datasets.proto import tf_example_pb2

FRAMES_KEY = "image/encoded"
LABEL_KEY = "clip/label/index"
TEXT_KEYS = ("clip/label/text", "clip/label/string")
ID_KEY = "video/filename"
FRAME_RATE_KEY = "clip/frame_rate"


@dataclasses.dataclass
class VideoRecord:
  jpegs: list[bytes]
  label: int
  text: str = ""
  video_id: str = ""
  frame_rate: float = 0.0  # 0: unknown
  start_us: int | None = None
  end_us: int | None = None


def serialize(record: VideoRecord) -> bytes:
  example = tf_example_pb2.SequenceExample()
  context = example.context.feature
  context[LABEL_KEY].int64_list.value.append(record.label)
  context[TEXT_KEYS[0]].bytes_list.value.append(record.text.encode())
  context[ID_KEY].bytes_list.value.append(record.video_id.encode())
  if record.frame_rate:
    context[FRAME_RATE_KEY].float_list.value.append(record.frame_rate)
  if record.start_us is not None:
    context["clip/start/timestamp"].int64_list.value.append(record.start_us)
  if record.end_us is not None:
    context["clip/end/timestamp"].int64_list.value.append(record.end_us)
  frames = example.feature_lists.feature_list[FRAMES_KEY].feature
  for jpeg in record.jpegs:
    frames.add().bytes_list.value.append(jpeg)
  return example.SerializeToString()


def parse(payload: bytes) -> VideoRecord:
  """A record from a serialized SequenceExample; ValueError names what is missing."""
  example = tf_example_pb2.SequenceExample.FromString(payload)
  context = example.context.feature
  if FRAMES_KEY not in example.feature_lists.feature_list:
    raise ValueError(f"no '{FRAMES_KEY}' feature list")
  jpegs = [f.bytes_list.value[0] for f in example.feature_lists.feature_list[FRAMES_KEY].feature
           if f.bytes_list.value]
  if not jpegs:
    raise ValueError(f"'{FRAMES_KEY}' holds no frames")
  labels = context[LABEL_KEY].int64_list.value if LABEL_KEY in context else []
  text = next((context[k].bytes_list.value[0].decode("utf-8", "replace") for k in TEXT_KEYS
               if k in context and context[k].bytes_list.value), "")

  def first(key, kind, default):
    values = getattr(context[key], kind).value if key in context else []
    return values[0] if values else default

  return VideoRecord(
      jpegs=jpegs, label=int(labels[0]) if labels else -1, text=text,
      video_id=first(ID_KEY, "bytes_list", b"").decode("utf-8", "replace"),
      frame_rate=float(first(FRAME_RATE_KEY, "float_list", 0.0)),
      start_us=first("clip/start/timestamp", "int64_list", None),
      end_us=first("clip/end/timestamp", "int64_list", None))
