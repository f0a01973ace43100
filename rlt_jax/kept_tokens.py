"""How many tokens RLT keeps, and pictures of which.

    python -m rlt_jax.kept_tokens --video FILE.mp4 [--num_frames 16] [--image_size 224] [--stride 4]
        [--thresholds 0.05,0.1,0.2] [--save_png out.png] [--save_gif out.gif]
    python -m rlt_jax.kept_tokens --data '/data/k400/val.tfrecord-*' [--max_clips 1000]
    python -m rlt_jax.kept_tokens --frames clips.npy      # uint8 (N, T, H, W, 3)
        [--reference run_start] [--train_batch 32]
    python -m rlt_jax.kept_tokens sweep --frames clips.npy [--thresholds 0,0.05,…] \
        [--target 0.5] [--variant B/16] [--save_png sweep.png] [--output sweep.json]

A video gives one clip per num_frames × stride frames (at least one), placed as the release's
test clips (short side image_size, centre crop); a dataset gives one centre view per video;
--frames takes clips of any T × H × W that are multiples of the tubelet (2) and patch (16).
For each τ: tokens kept per clip (a row each for a video), and over all clips the mean, p10,
p50, p90 and a histogram of the kept fraction. `--reference run_start` compares each tubelet
with the start of its run (rlt.Policy); `--train_batch B` adds the share kept in training,
after the release's Mixup/CutMix and erasing on batches of B, with the mask of the mixed clips
(the release) and with each clip's own mask carried through the mixing (rlt.mask_before_mix).

`sweep` chooses τ for a budget: the kept share (mean, p10, p90) and the ideal speedup of a
model's blocks for each τ, a plot and JSON, and with `--target` the smallest τ that keeps at
most that share.

The pictures show the first clip at the first τ. The PNG has a column per tubelet: its first
frame as decoded above its tokens; the GIF shows every frame beside its tokens. Dropped tokens
are greyed out, kept ones framed in the colour of their run length (blue: 1 tubelet … red: the
whole clip); a title gives τ and the tokens kept, a legend the colours.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import math
import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rlt_jax import layout, rlt
from rlt_jax.data import input_pipeline, video
from rlt_jax.models import vit
from rlt_jax.runtime import files
from rlt_jax.training import augment, recipes

TUBELET, PATCH = 2, 16
NUM_FRAMES, IMAGE_SIZE, STRIDE = 16, 224, 4  # the release's clips, for --video and --data
MARGIN, GAP, SWATCH = 10, 8, 12  # picture layout, pixels
MIN_PANEL_WIDTH = 176  # narrower frames are enlarged (nearest) so that their labels fit
DROPPED_GREY = 128  # dropped pixels become 0.25 · pixel + 0.75 · this


def video_clips(path: str, *, num_frames: int = NUM_FRAMES, image_size: int = IMAGE_SIZE,
                stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
  """(clips, sources): the clips and, per clip position, its source frame (-1: past the
  video's end, where the clip repeats the last frame)."""
  per_video = lambda n: max(1, n // (num_frames * stride))
  clips = video.read_test_views(path, clips=per_video, crops=1, clip_len=num_frames,
                                stride=stride, size=image_size)
  n = video.count_frames(path)
  return clips, video.test_clip_sources(n, clips=per_video(n), clip_len=num_frames,
                                        stride=stride)


def padded_tubelets(sources: np.ndarray | None, tubelets: int) -> np.ndarray:
  """bool (clips, T'): tubelets whose every frame lies past the video's end (padding)."""
  if sources is None:
    return np.zeros((1, tubelets), bool)
  return (sources.reshape(len(sources), tubelets, TUBELET) < 0).all(-1)


def data_clips(patterns: str, max_clips: int, *, num_frames: int = NUM_FRAMES,
               image_size: int = IMAGE_SIZE, stride: int = STRIDE) -> np.ndarray:
  sampling = input_pipeline.Sampling(num_frames=num_frames, stride=stride, image_size=image_size)
  clips = []
  for batch in input_pipeline.make_dataset(patterns, mode="eval", sampling=sampling,
                                           batch_size=1):
    if batch["valid"][0]:
      clips.append(batch["frames"][0])
    if len(clips) >= max_clips:
      break
  return np.stack(clips)


def load_clips(path: str) -> np.ndarray:
  """The clips in a .npy, or in a .npz its array 'frames', else its first uint8 array of 5 dims
  (so the test fixture, which also holds logits and masks, works as it is)."""
  try:
    data = np.load(path, mmap_mode="r", allow_pickle=False)  # mmap: clips are read in chunks
    if not isinstance(data, np.lib.npyio.NpzFile):
      return data
    with data:
      if "frames" in data.files:
        return data["frames"]
      held = []
      for name in data.files:
        array = data[name]
        if array.dtype == np.uint8 and array.ndim == 5:
          return array
        held.append(f"{name} {array.dtype} {array.shape}")
  except (ValueError, EOFError, zipfile.BadZipFile) as e:  # numpy's first sentence says why
    raise ValueError(f"{path}: not a .npy or .npz of plain arrays ({str(e).split('. ')[0]})"
                     ) from None
  raise ValueError(f"{path}: no array 'frames' and no uint8 array with 5 dims; it holds "
                   f"{', '.join(held) or 'nothing'}")


def check_clips(clips: np.ndarray, source: str) -> None:
  """Refuses what the mask cannot take, saying what was expected."""
  shape = clips.shape
  if (clips.dtype != np.uint8 or clips.ndim != 5 or shape[4] != 3 or 0 in shape[1:4]
      or shape[1] % TUBELET or shape[2] % PATCH or shape[3] % PATCH):
    raise ValueError(f"{source}: expected uint8 clips (N, T, H, W, 3) with T a multiple of "
                     f"{TUBELET} and H, W multiples of {PATCH}; got {clips.dtype} {shape}")
  if not len(clips):
    raise ValueError(f"{source}: holds no clips (shape {shape})")


def parse_thresholds(text: str) -> list[float]:
  try:
    thresholds = [float(t) for t in text.split(",")]
  except ValueError:
    thresholds = []
  if not thresholds or not all(math.isfinite(t) and t >= 0 for t in thresholds):
    raise ValueError(f"--thresholds {text!r}: expected comma-separated finite numbers ≥ 0")
  return thresholds


def mask_at(clips: np.ndarray, threshold: float, reference: str = "previous") -> np.ndarray:
  """RLT's keep mask (N, T', h, w) of uint8 clips at τ = `threshold`."""
  return rlt.keep_mask(rlt.normalize(np.asarray(clips)), threshold=threshold,
                       tubelet_size=TUBELET, patch_size=PATCH, reference=reference)


def counts_at(clips: np.ndarray, threshold: float, chunk: int = 4,
              padded: np.ndarray | None = None, reference: str = "previous") -> np.ndarray:
  """Tokens kept per clip, `chunk` clips at a time (the mask takes ~10× a clip's uint8
  bytes); tubelets marked in `padded` (clips, T') are left out."""
  counts = []
  for i in range(0, len(clips), chunk):
    mask = mask_at(clips[i:i + chunk], threshold, reference)
    if padded is not None:
      mask = mask & ~padded[i:i + chunk, :, None, None]
    counts.append(mask.sum((1, 2, 3)))
  return np.concatenate(counts)


def histogram(fractions: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
  counts, edges = np.histogram(fractions, bins=bins, range=(0, 1))
  top = max(int(counts.max()), 1)
  return [f"  {edges[i]:4.0%}–{edges[i + 1]:4.0%} {'#' * round(width * c / top):{width}s} {c}"
          for i, c in enumerate(counts)]


# ------------------------------------------------------------------------------------------
# Pictures. PIL's default font has no τ, en dash or ×, so their text is ASCII.


def run_colours(tubelets: int) -> np.ndarray:
  """uint8 (tubelets + 1, 3): row k is the frame colour of a run of k tubelets (blue for 1 …
  red for the whole clip); row 0, for dropped tokens, is grey."""
  hues = 0.66 * (1 - np.arange(tubelets) / max(tubelets - 1, 1))
  runs = [np.round(255 * np.asarray(colorsys.hsv_to_rgb(h, 1.0, 1.0))) for h in hues]
  return np.asarray([(DROPPED_GREY,) * 3, *runs], np.uint8)


def overlay(clip: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(T, H, W, 3) uint8: every frame with its tubelet's dropped tokens greyed out and its kept
  tokens framed (2 px) in their run length's colour; `mask` is the clip's (T', h, w)."""
  def pixels(tokens: np.ndarray) -> np.ndarray:
    return tokens.repeat(TUBELET, 0).repeat(PATCH, 1).repeat(PATCH, 2)

  kept, lengths = pixels(mask), pixels(rlt.run_lengths(mask))
  border = np.ones((PATCH, PATCH), bool)
  border[2:-2, 2:-2] = False
  framed = kept & np.tile(border, mask.shape[1:])
  out = np.where(kept[..., None], clip, (0.25 * clip + 0.75 * DROPPED_GREY).astype(np.uint8))
  out[framed] = run_colours(mask.shape[0])[lengths[framed]]
  return out


def _font(size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=size)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
  ascent, descent = font.getmetrics()
  return ascent + descent + 2


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
  lines = [""]
  for word in text.split():
    joined = f"{lines[-1]} {word}".lstrip()
    if lines[-1] and font.getlength(joined) > width:
      lines.append(word)
    else:
      lines[-1] = joined
  return lines


def _flow(texts: list[str], font: ImageFont.FreeTypeFont, width: int) -> list[tuple[int, int]]:
  """(top, left) of each legend entry (a swatch and its text), wrapped to `width`."""
  places, top, left = [], 0, 0
  for text in texts:
    entry = SWATCH + 5 + math.ceil(font.getlength(text))
    if left and left + entry > width:
      top, left = top + _line_height(font), 0
    places.append((top, left))
    left += entry + 3 * GAP
  return places


def _sheet(heading: list[str], cells: list[list[tuple[list[str], list[np.ndarray]]]],
           tubelets: int) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
  """A white picture: `heading` (its first line the title), rows of cells, each label lines
  above panels stacked vertically (all panels of one size), and the run-length legend.

  Returns the picture and, cell by cell in reading order, the (top, left) of each panel.
  """
  title_font, font = _font(18), _font(13)
  line = _line_height(font)
  panel_h, panel_w = cells[0][0][1][0].shape[:2]
  inner = max(len(row) for row in cells) * (panel_w + GAP) - GAP
  title = _wrap(heading[0], title_font, inner)
  notes = [wrapped for text in heading[1:] for wrapped in _wrap(text, font, inner)]
  colours = run_colours(tubelets)
  legend = ["dropped (greyed out)"] + [f"kept, run of {k} tubelet{'s' * (k > 1)}"
                                       for k in range(1, tubelets + 1)]
  places = _flow(legend, font, inner)
  labels = max(len(label) for row in cells for label, _ in row)
  stack = max(len(panels) for row in cells for _, panels in row)
  cell_h = labels * line + stack * (panel_h + GAP // 2) - GAP // 2
  top = MARGIN + len(title) * _line_height(title_font) + len(notes) * line + GAP
  legend_top = top + len(cells) * (cell_h + GAP)
  sheet = np.full((legend_top + places[-1][0] + line + MARGIN, inner + 2 * MARGIN, 3), 255,
                  np.uint8)
  texts, positions = [], []
  for row in cells:
    for column, (label, panels) in enumerate(row):
      left = MARGIN + column * (panel_w + GAP)
      texts += [(left, top + k * line, text) for k, text in enumerate(label)]
      positions.append([(top + labels * line + k * (panel_h + GAP // 2), left)
                        for k in range(len(panels))])
      for (y, x), panel in zip(positions[-1], panels):
        sheet[y:y + panel_h, x:x + panel_w] = panel
    top += cell_h + GAP
  image = Image.fromarray(sheet)
  draw = ImageDraw.Draw(image)
  for k, text in enumerate(title):
    draw.text((MARGIN, MARGIN + k * _line_height(title_font)), text, fill=0, font=title_font)
  notes_top = MARGIN + len(title) * _line_height(title_font)
  for k, text in enumerate(notes):
    draw.text((MARGIN, notes_top + k * line), text, fill=(60, 60, 60), font=font)
  for left, y, text in texts:
    draw.text((left, y), text, fill=0, font=font)
  for (y, x), text, colour in zip(places, legend, colours):
    y, x = legend_top + y, MARGIN + x
    swatch_top = y + (line - SWATCH) // 2
    draw.rectangle((x, swatch_top, x + SWATCH - 1, swatch_top + SWATCH - 1),
                   fill=tuple(int(c) for c in colour))
    draw.text((x + SWATCH + 5, y), text, fill=0, font=font)
  return np.asarray(image), positions


def _enlarge(frames: np.ndarray) -> np.ndarray:
  """Frames (..., H, W, 3) enlarged by a whole factor (nearest) to MIN_PANEL_WIDTH or more."""
  factor = -(-MIN_PANEL_WIDTH // frames.shape[-2])
  return frames.repeat(factor, -3).repeat(factor, -2)


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a clip's frames come from: each position's source frame (-1: padding past the
  video's end) and the video's frame rate. Without one, positions are labelled in the clip."""
  frames: np.ndarray
  rate: float


def _heading(clip: np.ndarray, mask: np.ndarray, threshold: float, caption: str,
             source: Source | None) -> list[str]:
  padded = padded_tubelets(None if source is None else source.frames[None], len(mask))[0]
  kept, total = int(mask[~padded].sum()), int(mask[~padded].size)
  t, h, w = clip.shape[:3]
  share = kept / max(total, 1)
  lines = [f"RLT at tau = {threshold:g}: {kept} of {total} tokens kept ({share:.1%})",
           f"{caption}: {t} frames of {w}x{h}, {mask.shape[0]} tubelets of {TUBELET} frames, "
           f"{mask.shape[2]}x{mask.shape[1]} patches of {PATCH}x{PATCH} pixels."]
  if padded.any():
    lines.append(f"The video ends before the clip: its last {int(padded.sum())} tubelet(s) "
                 "repeat the last frame (padding, marked and left out of the count).")
  return lines


def _frames_text(source: Source | None, first: int, last: int) -> list[str]:
  """Clip positions first..last: as the video's own frames and times when the source is
  known (one line each, to fit a panel), else as clip positions."""
  if source is None:
    return [f"frames {first}-{last}"]
  real = [int(f) for f in source.frames[first:last + 1] if f >= 0]
  if not real:
    return ["padding", "(past the video's end)"]
  if real[0] == real[-1]:
    return [f"video frame {real[0]}", f"at {real[0] / source.rate:.2f} s"]
  return [f"video frames {real[0]}-{real[-1]}",
          f"at {real[0] / source.rate:.2f}-{real[-1] / source.rate:.2f} s"]


def _tubelet_label(mask: np.ndarray, j: int, source: Source | None = None) -> list[str]:
  kept, total = int(mask[j].sum()), mask[j].size
  first, *rest = _frames_text(source, j * TUBELET, (j + 1) * TUBELET - 1)
  if first == "padding":
    return [f"tubelet {j}: padding", *rest, "not counted"]
  return [f"tubelet {j}: {first}", *rest, f"{kept} of {total} kept ({kept / total:.0%})"]


def picture(clip: np.ndarray, mask: np.ndarray, threshold: float, caption: str,
            source: Source | None = None) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
  """The PNG: per tubelet (4 a row) its first frame as decoded above its tokens.

  Returns it and, per tubelet, the (top, left) of the frame and of the tokens.
  """
  frames, tokens = _enlarge(clip[::TUBELET]), _enlarge(overlay(clip, mask)[::TUBELET])
  cells = [(_tubelet_label(mask, j, source), [frames[j], tokens[j]]) for j in range(len(mask))]
  heading = _heading(clip, mask, threshold, caption, source) + [
      "Top: the first frame of each tubelet as decoded. Below: its tokens."]
  return _sheet(heading, [cells[i:i + 4] for i in range(0, len(cells), 4)], len(mask))


def animation(clip: np.ndarray, mask: np.ndarray, threshold: float, caption: str,
              source: Source | None = None) -> list[np.ndarray]:
  """The GIF's frames: each frame as decoded beside its tokens."""
  frames, tokens = _enlarge(clip), _enlarge(overlay(clip, mask))
  heading = _heading(clip, mask, threshold, caption, source)
  return [_sheet(heading, [[([f"clip frame {t} of 0-{len(clip) - 1}",
                              *_frames_text(source, t, t)], [frames[t]]),
                             (_tubelet_label(mask, t // TUBELET, source), [tokens[t]])]],
                 len(mask))[0]
          for t in range(len(clip))]


# ------------------------------------------------------------------------------------------
# The command line.


def _geometry(args: argparse.Namespace) -> dict[str, int]:
  """--num_frames, --image_size and --stride, checked, defaults filled in."""
  given = {"num_frames": args.num_frames, "image_size": args.image_size, "stride": args.stride}
  if args.frames and any(v is not None for v in given.values()):
    raise ValueError("--num_frames, --image_size and --stride are for --video and --data; "
                     "--frames clips have their own shape")
  sizes = {k: d if given[k] is None else given[k]
           for k, d in zip(given, (NUM_FRAMES, IMAGE_SIZE, STRIDE))}
  for flag, multiple in (("num_frames", TUBELET), ("image_size", PATCH), ("stride", 1)):
    if sizes[flag] < 1 or sizes[flag] % multiple:
      raise ValueError(f"--{flag} {sizes[flag]}: expected a positive multiple of {multiple}")
  return sizes


def _source_arguments(parser: argparse.ArgumentParser) -> None:
  """The clips to look at and their geometry (shared by the statistics and the sweep)."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--video", help="a video file (mp4, webm, avi …)")
  source.add_argument("--data", help="TFRecord shards (glob)")
  source.add_argument("--frames", help="uint8 clips (N, T, H, W, 3): a .npy, or a .npz whose "
                      "array 'frames' (else its first uint8 array with 5 dims) is used")
  parser.add_argument("--num_frames", type=int, help=f"--video/--data: frames per clip "
                      f"(default {NUM_FRAMES})")
  parser.add_argument("--image_size", type=int, help=f"--video/--data: clip height and width "
                      f"(default {IMAGE_SIZE})")
  parser.add_argument("--stride", type=int, help=f"--video/--data: take every stride-th frame "
                      f"(default {STRIDE})")
  parser.add_argument("--reference", choices=rlt.REFERENCES, default="previous",
                      help="what a tubelet is compared with (rlt.Policy reference)")
  parser.add_argument("--max_clips", type=int, default=1000, help="use at most this many clips")


def _load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None, float | None]:
  """(clips, source frames or None, frame rate or None) as the arguments name them."""
  sizes = _geometry(args)
  if args.max_clips < 1:
    raise ValueError(f"--max_clips {args.max_clips}: expected a positive integer")
  name = args.video or args.data or args.frames
  if (args.video or args.frames) and not os.path.isfile(name):
    raise ValueError(f"{name}: no such file")
  sources, rate = None, None
  if args.frames:
    clips = load_clips(args.frames)
  elif args.video:
    clips, sources = video_clips(args.video, **sizes)
    rate = video.frame_rate(args.video)
  else:
    clips = data_clips(args.data, args.max_clips, **sizes)
  check_clips(clips, name)
  return clips[:args.max_clips], sources, rate


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["sweep"]:
    return sweep_main(argv[1:])
  parser = argparse.ArgumentParser(prog="python -m rlt_jax.kept_tokens", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  _source_arguments(parser)
  parser.add_argument("--thresholds", default="0.1", help="comma-separated τ values")
  parser.add_argument("--train_batch", type=int, help="also the share kept in training: the "
                      "release's Mixup/CutMix and erasing on batches of this many clips, with "
                      "the mask after them (the release) and carried from before them")
  parser.add_argument("--save_png", help="picture of the first clip's tokens at the first τ")
  parser.add_argument("--save_gif", help="the same, animated frame by frame")
  args = parser.parse_args(argv)
  name = args.video or args.data or args.frames
  try:
    thresholds = parse_thresholds(args.thresholds)
    files.check_output(args.save_png, "--save_png")
    files.check_output(args.save_gif, "--save_gif")
    if args.train_batch is not None and args.train_batch < 2:
      raise ValueError(f"--train_batch {args.train_batch}: expected ≥ 2 (clips mix in pairs)")
    clips, sources, rate = _load(args)
    if args.train_batch and args.train_batch > len(clips):
      raise ValueError(f"--train_batch {args.train_batch}: more than the {len(clips)} clip(s) "
                       f"of {name}")
  except (ValueError, OSError, video.VideoError) as e:
    sys.exit(f"error: {e}")
  t, h, w = clips.shape[1:4]
  grid = rlt.token_grid(clips.shape, TUBELET, PATCH)
  per_tubelet, total = grid[1] * grid[2], math.prod(grid)
  padded = None if sources is None else padded_tubelets(sources[:len(clips)], grid[0])
  totals = np.full(len(clips), total) if padded is None else (~padded).sum(1) * per_tubelet
  print(f"{len(clips)} clip(s) of {t} × {h}×{w} ({total} tokens each) from {name}"
        + ("" if args.reference == "previous" else ", runs compared with their start"))
  if padded is not None and padded.any():
    print(f"  the video is shorter than its clip: {int(padded.sum())} tubelet(s) past its end "
          "repeat the last frame; they are padding and left out of every count below")
  for threshold in thresholds:
    kept = counts_at(clips, threshold, padded=padded, reference=args.reference)
    p10, p50, p90 = np.percentile(kept, [10, 50, 90])
    print(f"τ = {threshold:g}: {kept.mean():.0f} of {totals.mean():.0f} kept on average "
          f"({kept.sum() / totals.sum():.1%}); p10 {p10:.0f}, p50 {p50:.0f}, p90 {p90:.0f}")
    if args.video:
      print("  per clip: " + " ".join(str(int(k)) for k in kept))
    print("\n".join(histogram(kept / totals)))
  if args.train_batch:
    after, before, batches = train_time_fractions(clips, thresholds[0], args.reference,
                                                  args.train_batch)
    print(f"in training (τ = {thresholds[0]:g}, {batches} batch(es) of {args.train_batch} × 4 "
          f"seeds, the release's Mixup/CutMix and erasing): {after:.1%} kept with the mask of "
          f"the mixed clips (the release), {before:.1%} with each clip's mask carried through "
          "the mixing (rlt.mask_before_mix)")
  if args.save_png or args.save_gif:
    clip = np.asarray(clips[0])
    mask = mask_at(clip[None], thresholds[0], args.reference)[0]
    caption = f"clip 1 of {len(clips)} from {os.path.basename(name)}" + (
        "" if args.reference == "previous" else ", runs compared with their start")
    source = None if sources is None else Source(sources[0], rate)
  if args.save_png:
    with files.atomic_write(args.save_png, "wb") as f:
      Image.fromarray(picture(clip, mask, thresholds[0], caption, source)[0]).save(
          f, format="PNG")
    print(f"wrote {args.save_png}")
  if args.save_gif:
    # Octree keeps the colours of small areas (frames, swatches); median cut merges them.
    images = [Image.fromarray(a).quantize(256, method=Image.Quantize.FASTOCTREE)
              for a in animation(clip, mask, thresholds[0], caption, source)]
    with files.atomic_write(args.save_gif, "wb") as f:
      images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=150,
                     loop=0)
    print(f"wrote {args.save_gif}")


# ------------------------------------------------------------------------------------------
# Training: the kept share after the release's augmentation, both ways.


def train_time_fractions(clips: np.ndarray, threshold: float, reference: str, batch: int,
                         seeds: int = 4) -> tuple[float, float, int]:
  """(share kept with the mask after mixing, share kept with masks carried from before it,
  batches): the release's recipe (Mixup 0.8 / CutMix 1.0, switch 0.5, erasing 0.25) on the
  clips in batches of `batch` (in their order), each with `seeds` draws of the augmentation."""
  aug = augment.Augment(num_classes=1, **recipes.base().augment)
  policy = rlt.Policy("rlt", threshold, reference=reference)
  grid = rlt.token_grid(clips.shape, TUBELET, PATCH)
  count = len(clips) // batch
  if count == 0:
    raise ValueError(f"--train_batch {batch}: more than the {len(clips)} clip(s) there are")
  select = lambda x: rlt.select(x, policy, tubelet_size=TUBELET, patch_size=PATCH)
  labels = jnp.zeros(batch, jnp.int32)

  @jax.jit
  def kept(frames, seed):  # (after, before): as the train step computes them
    _, _, after, before = augment.augment_and_mask(
        *jax.random.split(jax.random.PRNGKey(seed)), rlt.normalize(frames), labels, aug, select,
        grid, patch_size=PATCH)
    return after.sum(), before.sum()

  after = before = 0
  for i in range(count):
    frames = jnp.asarray(clips[i * batch:(i + 1) * batch])
    for seed in range(seeds):
      a, b = kept(frames, seed)
      after, before = after + int(a), before + int(b)
  tokens = count * seeds * batch * math.prod(grid)
  return after / tokens, before / tokens, count


# ------------------------------------------------------------------------------------------
# Choosing τ for a budget.

SWEEP_THRESHOLDS = "0,0.025,0.05,0.075,0.1,0.15,0.2,0.3,0.4,0.5"


def sweep(clips: np.ndarray, thresholds: list[float], *, reference: str = "previous",
          variant: str = "B/16") -> list[dict]:
  """Per τ: the kept share (pooled mean, and p10 / p90 of the clips' shares) and the ideal
  speedup of `variant`'s blocks (FLOPs of every clip's own tokens against all tokens)."""
  width, _, _, mlp_dim, _ = vit.VARIANTS[variant]
  total = math.prod(rlt.token_grid(clips.shape, TUBELET, PATCH))
  rows = []
  for threshold in thresholds:
    kept = counts_at(clips, threshold, reference=reference)
    share = kept / total
    rows.append({"threshold": threshold, "kept_mean": float(kept.sum() / (total * len(kept))),
                 "kept_p10": float(np.percentile(share, 10)),
                 "kept_p90": float(np.percentile(share, 90)),
                 "ideal_speedup": 1 / layout.ideal_flops_ratio(kept, total, width, mlp_dim)})
  return rows


def threshold_for(clips: np.ndarray, target: float, *, reference: str = "previous",
                  tolerance: float = 1e-4) -> tuple[float, float]:
  """(τ, kept share): the smallest τ at which the clips keep at most `target` of their tokens
  (the share falls as τ grows; bisection to `tolerance`)."""
  grid = rlt.token_grid(clips.shape, TUBELET, PATCH)
  total = len(clips) * math.prod(grid)
  shares: dict[float, float] = {}  # a share is a full pass over the clips: each τ once

  def share(tau: float) -> float:
    if tau not in shares:
      shares[tau] = float(counts_at(clips, tau, reference=reference).sum()) / total
    return shares[tau]

  floor = 1 / grid[0]  # the first tubelet is always kept, whatever τ
  if target < floor:
    raise ValueError(f"--target {target}: even τ = ∞ keeps {floor:.1%} (every clip's first "
                     "tubelet); expected a share at least that")
  low, high = 0.0, 1.0
  while share(high) > target:  # a change score is at most a few units (normalised pixels)
    low, high = high, 2 * high
  while high - low > tolerance:
    middle = (low + high) / 2
    low, high = (middle, high) if share(middle) > target else (low, middle)
  return high, share(high)


def plot(rows: list[dict], title: str) -> np.ndarray:
  """A PNG-ready picture (RGB uint8): the kept share against τ (mean line, p10–p90 band) and
  the ideal speedup (second axis)."""
  width, height, left, right, top, bottom = 640, 420, 60, 60, 64, 50
  image = Image.new("RGB", (width, height), "white")
  draw, font = ImageDraw.Draw(image), _font(12)
  taus = [r["threshold"] for r in rows]
  top_speed = max(r["ideal_speedup"] for r in rows) * 1.1
  x = lambda tau: left + (width - left - right) * (tau - taus[0]) / max(taus[-1] - taus[0], 1e-9)
  y = lambda share: top + (height - top - bottom) * (1 - share)
  y2 = lambda speed: top + (height - top - bottom) * (1 - speed / top_speed)
  band = [(x(r["threshold"]), y(r["kept_p90"])) for r in rows] + [
      (x(r["threshold"]), y(r["kept_p10"])) for r in reversed(rows)]
  draw.polygon(band, fill=(200, 215, 240))
  draw.line([(x(r["threshold"]), y(r["kept_mean"])) for r in rows], fill=(30, 70, 180), width=3)
  draw.line([(x(r["threshold"]), y2(r["ideal_speedup"])) for r in rows], fill=(200, 60, 40),
            width=2)
  draw.rectangle((left, top, width - right, height - bottom), outline=0)
  for k in range(6):  # left axis: share kept
    share = k / 5
    draw.text((left - 38, y(share) - 7), f"{share:.0%}", fill=(30, 70, 180), font=font)
    speed = top_speed * k / 5
    draw.text((width - right + 6, y2(speed) - 7), f"{speed:.1f}x", fill=(200, 60, 40), font=font)
  last = -math.inf
  for r in rows:  # τ labels where they do not crowd each other
    if x(r["threshold"]) - last >= 36:
      draw.text((x(r["threshold"]) - 10, height - bottom + 6), f"{r['threshold']:g}", fill=0,
                font=font)
      last = x(r["threshold"])
  draw.text((width // 2 - 10, height - 22), "tau", fill=0, font=font)
  draw.text((left, 10), title, fill=0, font=_font(14))
  draw.text((left, 30), "kept share (left axis): mean (line), p10-p90 of the clips (band)",
            fill=(30, 70, 180), font=font)
  draw.text((left, 46), "ideal speedup (right axis)", fill=(200, 60, 40), font=font)
  return np.asarray(image)


def sweep_main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m rlt_jax.kept_tokens sweep",
      description="The kept share and the ideal speedup over a range of τ, and the τ that meets "
                  "a target share: for choosing τ on your own video.")
  _source_arguments(parser)
  parser.add_argument("--thresholds", default=SWEEP_THRESHOLDS, help="comma-separated τ values")
  parser.add_argument("--target", type=float, help="also the smallest τ keeping at most this "
                      "share of tokens (e.g. 0.5)")
  parser.add_argument("--variant", default="B/16", choices=sorted(vit.VARIANTS),
                      help="the model whose FLOPs give the ideal speedup")
  parser.add_argument("--save_png", help="plot of the sweep")
  parser.add_argument("--output", help="the sweep as JSON")
  args = parser.parse_args(argv)
  name = args.video or args.data or args.frames
  try:
    thresholds = sorted(parse_thresholds(args.thresholds))
    if args.target is not None and not 0 < args.target <= 1:
      raise ValueError(f"--target {args.target}: expected a share in (0, 1]")
    files.check_output(args.save_png, "--save_png")
    files.check_output(args.output, "--output")
    clips, _, _ = _load(args)
    rows = sweep(clips, thresholds, reference=args.reference, variant=args.variant)
    target = (threshold_for(clips, args.target, reference=args.reference)
              if args.target is not None else None)
  except (ValueError, OSError, video.VideoError) as e:
    sys.exit(f"error: {e}")
  print(f"{len(clips)} clip(s) from {name}; {args.variant}'s ideal speedup; runs compared with "
        f"{'the previous tubelet' if args.reference == 'previous' else 'their start'}")
  print(f"{'tau':>6s} {'kept':>7s} {'p10':>7s} {'p90':>7s} {'ideal':>7s}")
  for r in rows:
    print(f"{r['threshold']:6g} {r['kept_mean']:7.1%} {r['kept_p10']:7.1%} {r['kept_p90']:7.1%} "
          f"{r['ideal_speedup']:6.2f}x")
  result = {"source": name, "clips": len(clips), "reference": args.reference,
            "variant": args.variant, "rows": rows}
  if target is not None:
    result["target"] = {"share": args.target, "threshold": target[0], "kept": target[1]}
    print(f"τ = {target[0]:.4g} keeps {target[1]:.1%} (target: at most {args.target:.1%}); "
          f"train with --config.rlt.threshold={target[0]:.4g}")
  if args.save_png:
    with files.atomic_write(args.save_png, "wb") as f:
      Image.fromarray(plot(rows, f"RLT on {os.path.basename(name)} ({len(clips)} clips)")).save(
          f, format="PNG")
    print(f"wrote {args.save_png}")
  if args.output:
    files.write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
