"""PyTorch VideoMAE-2 checkpoints → rlt_jax models, without torch.

    python -m rlt_jax.convert --input vit_b_k400_ft.pth --output models/vit_b_k400 \
        [--variant B/16] [--num_classes N] [--head_map k710_to_k400.json] [--allow_nonfinite]

Understands the VideoMAE-2 release layout (weights under `module`, `model`, `state_dict` or at
top level; `_orig_mod.`, `module.`, `backbone.`, `encoder.` prefixes) and mmaction2's
(`patch_embed.projection`, `mlp.layers.*`, `cls_head.fc_cls`, a stored `pos_embed` that must
equal the fixed table). Every tensor must be used and every parameter found; otherwise the
error lists each offending key with its expected and found shapes, and nothing is written.
Weights holding NaN or ±inf are refused unless --allow_nonfinite. The file is read safely
(`torch_checkpoint`); every failure is one `error: …` line and a non-zero exit. The output
directory appears complete or not at all, even when two converts race to write it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
from typing import Any

import jax
import numpy as np

from rlt_jax.checkpoints import checkpoint, torch_checkpoint
from rlt_jax.models import vit
from rlt_jax.runtime import files

STANDARD_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
WRAPPER_KEYS = ("module", "model", "state_dict")
PREFIXES = ("_orig_mod.", "module.", "backbone.", "encoder.")
MMACTION_RENAMES = (("patch_embed.projection.", "patch_embed.proj."),
                    (".mlp.layers.0.0.", ".mlp.fc1."), (".mlp.layers.1.", ".mlp.fc2."),
                    ("cls_head.fc_cls.", "head."))
PRETRAINING_KEY = re.compile(r"(^|\.)(decoder\.|encoder_to_decoder\.|mask_token)")
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
SHOWN = 5  # offending tensors named in a message


class ConversionError(ValueError):
  """The checkpoint cannot be converted; the message names every offending key."""


def find_state_dict(tree: Any, source: str) -> tuple[dict[str, np.ndarray], str]:
  """The weights dict and where it was found ('module', 'model', … or 'top level')."""
  is_weights = lambda d: isinstance(d, dict) and d and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in d.items())
  if isinstance(tree, dict):
    for key in WRAPPER_KEYS:
      if is_weights(tree.get(key)):
        return dict(tree[key]), key
    if is_weights(tree):
      return dict(tree), "top level"
  keys = list(tree)[:10] if isinstance(tree, dict) else type(tree).__name__
  raise ConversionError(f"{source}: no weights found under {WRAPPER_KEYS} or at top level "
                        f"(found {keys})")


def normalize_keys(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Strips wrapper prefixes and maps mmaction2 names onto VideoMAE-2's."""
  pretraining = [k for k in state if PRETRAINING_KEY.search(k)]
  if pretraining:
    raise ConversionError(
        f"{source} is a VideoMAE-2 pre-training checkpoint (encoder + decoder: "
        f"{len(pretraining)} decoder tensors such as '{pretraining[0]}', no classification "
        "head). Convert a fine-tuned checkpoint (the model zoo's *_ft / distilled files)")
  out = {}
  for key, value in state.items():
    stripped = True
    while stripped:
      stripped = False
      for prefix in PREFIXES:
        if key.startswith(prefix):
          key, stripped = key[len(prefix):], True
    for old, new in MMACTION_RENAMES:
      key = key.replace(old, new)
    if key in out:
      raise ConversionError(f"{source}: two tensors map to '{key}' after removing prefixes")
    out[key] = value
  if "norm.weight" in out and "fc_norm.weight" not in out:
    raise ConversionError(f"{source}: a CLS-token model (norm.* instead of fc_norm.*); "
                          "rlt_jax implements mean pooling only")
  return out


def infer_architecture(state: dict[str, np.ndarray], source: str,
                       variant_name: str | None = None) -> dict[str, Any]:
  """Width, depth, MLP width, patch and tubelet size and classes from the tensors."""
  for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "head.weight"):
    if key not in state:
      raise ConversionError(f"{source}: no '{key}'; not a VideoMAE-2 fine-tuned ViT "
                            f"(first keys: {list(state)[:8]})")
  shape = state["patch_embed.proj.weight"].shape
  if len(shape) != 5 or shape[1] != 3 or shape[3] != shape[4]:
    raise ConversionError(f"{source}: patch_embed.proj.weight has shape {shape}; expected "
                          "(D, 3, t, p, p)")
  for key in ("blocks.0.mlp.fc1.weight", "head.weight"):
    if state[key].ndim != 2:
      raise ConversionError(f"{source}: {key} has shape {state[key].shape}; expected a matrix")
  width, _, tubelet, patch, _ = shape
  depth = 1 + max(int(m.group(1)) for k in state if (m := BLOCK_KEY.match(k)))
  arch = dict(width=int(width), depth=depth, mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
              patch_size=int(patch), tubelet_size=int(tubelet),
              num_classes=int(state["head.weight"].shape[0]))
  if variant_name is not None:
    want = vit.ModelSpec.from_variant(variant_name, num_classes=arch["num_classes"]).to_dict()
    clash = {k: (want[k], arch[k]) for k in ("width", "depth", "mlp_dim", "patch_size")
             if want[k] != arch[k]}
    if clash:
      raise ConversionError(f"{source}: --variant {variant_name} does not match the tensors "
                            f"(field: (variant, checkpoint)) {clash}")
    arch["num_heads"] = want["num_heads"]
  elif arch["width"] in STANDARD_HEADS:
    arch["num_heads"] = STANDARD_HEADS[arch["width"]]
  else:
    raise ConversionError(f"{source}: width {arch['width']} is not a standard VideoMAE-2 width "
                          f"{sorted(STANDARD_HEADS)}; pass --variant to give the head count")
  return arch


def expected_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Every tensor a VideoMAE-2 fine-tuned ViT of this architecture has, in torch layout."""
  d, h, k = arch["width"], arch["mlp_dim"], arch["num_classes"]
  shapes = {"patch_embed.proj.weight": (d, 3, arch["tubelet_size"], arch["patch_size"],
                                        arch["patch_size"]),
            "patch_embed.proj.bias": (d,), "fc_norm.weight": (d,), "fc_norm.bias": (d,),
            "head.weight": (k, d), "head.bias": (k,)}
  for i in range(arch["depth"]):
    b = f"blocks.{i}."
    shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,),
               b + "norm2.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
               b + "attn.q_bias": (d,), b + "attn.v_bias": (d,),
               b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
               b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,),
               b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,)}
  return shapes


def fold_extras(state: dict[str, np.ndarray], arch: dict[str, Any], num_tokens: int,
                source: str) -> list[str]:
  """Folds layer scale and a qkv bias into the standard tensors and checks a stored
  pos_embed; returns notes for the summary. Works in float32."""
  notes = set()
  d = arch["width"]
  for i in range(arch["depth"]):
    b = f"blocks.{i}."
    for gamma, target in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
      # x + γ ⊙ (W y + c)  ==  x + (diag(γ) W) y + γ ⊙ c; what does not fit is left for
      # check_tensors to report
      w, c, g = (state.get(b + k) for k in (target + ".weight", target + ".bias", gamma))
      if all(x is not None for x in (w, c, g)) and g.shape == c.shape == (d,) and (
          w.ndim == 2 and w.shape[0] == d):
        g = state.pop(b + gamma).astype(np.float32)
        state[b + target + ".weight"] = w.astype(np.float32) * g[:, None]
        state[b + target + ".bias"] = c.astype(np.float32) * g
        notes.add(f"folded {gamma} (layer scale) into {target} of every block")
    if state.get(b + "attn.qkv.bias", np.empty(0)).shape == (3 * d,) and (
        b + "attn.q_bias" not in state):
      bias = state.pop(b + "attn.qkv.bias")
      state[b + "attn.q_bias"], state[b + "attn.v_bias"] = bias[:d], bias[2 * d:]
      # A key bias adds the same q·b_k to every logit of a query: softmax ignores it.
      notes.add("split attn.qkv.bias into q_bias / v_bias (the key bias cancels in softmax)")
  if "pos_embed" in state:
    stored = state.pop("pos_embed").astype(np.float64)
    if stored.size != num_tokens * d:
      raise ConversionError(f"{source}: stored pos_embed has shape {stored.shape} but the model "
                            f"has {num_tokens} positions of width {d}; set --num_frames / "
                            "--image_size")
    stored = stored.reshape(num_tokens, d)
    error = np.abs(stored - vit.sinusoid_table(num_tokens, d)).max()
    if error > 1e-3:
      raise ConversionError(f"{source}: stored pos_embed differs from the fixed sin/cos table "
                            f"by {error:.3g}; learned or interpolated tables are not supported")
    notes.add(f"checked the stored pos_embed against the fixed table (max diff {error:.1e})")
  return sorted(notes)


def nonfinite_tensors(state: dict[str, np.ndarray]) -> list[str]:
  """Keys of the tensors holding NaN or ±inf once in float32 (what the model would hold)."""
  return [k for k, v in state.items() if v.dtype.kind not in "biu" and
          not np.isfinite(np.asarray(v, np.float32)).all()]


def check_tensors(state: dict[str, np.ndarray], arch: dict[str, Any], source: str) -> None:
  want = expected_shapes(arch)
  problems = [f"  missing {k}: expected shape {s}" for k, s in want.items() if k not in state]
  problems += [f"  unused {k}: shape {tuple(v.shape)}" for k, v in state.items() if k not in want]
  problems += [f"  wrong shape {k}: expected {want[k]}, found {tuple(v.shape)}"
               for k, v in state.items() if k in want and tuple(v.shape) != want[k]]
  if problems:
    raise ConversionError(f"{source}: cannot convert; {len(problems)} problem(s):\n" +
                          "\n".join(problems))


def to_flax(state: dict[str, np.ndarray], arch: dict[str, Any]) -> dict[str, Any]:
  """VideoMAE-2 tensors (torch layout) → the rlt_jax parameter tree, float32."""
  f = lambda k: np.asarray(state[k], np.float32)
  dense = lambda k: {"kernel": f(k + ".weight").T, "bias": f(k + ".bias")}
  norm = lambda k: {"scale": f(k + ".weight"), "bias": f(k + ".bias")}
  params = {
      "patch_embed": {"kernel": f("patch_embed.proj.weight").transpose(2, 3, 4, 1, 0),
                      "bias": f("patch_embed.proj.bias")},
      "fc_norm": norm("fc_norm"), "head": dense("head")}
  for i in range(arch["depth"]):
    b = f"blocks.{i}."
    params[f"blocks_{i}"] = {
        "norm1": norm(b + "norm1"), "norm2": norm(b + "norm2"),
        "attn": {"qkv": {"kernel": f(b + "attn.qkv.weight").T}, "q_bias": f(b + "attn.q_bias"),
                 "v_bias": f(b + "attn.v_bias"), "proj": dense(b + "attn.proj")},
        "mlp": {"fc1": dense(b + "mlp.fc1"), "fc2": dense(b + "mlp.fc2")}}
  return params


def read_head_map(path: str, num_classes: int) -> np.ndarray:
  try:
    rows = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"--head_map {path}: cannot read a JSON list of class indices ({e})")
  if not (isinstance(rows, list) and rows and all(isinstance(r, int) and not isinstance(r, bool)
                                                  for r in rows)):
    raise ConversionError(f"--head_map {path}: expected a non-empty JSON list of ints")
  bad = [r for r in rows if not 0 <= r < num_classes]
  if bad:
    raise ConversionError(f"--head_map {path}: indices {bad[:5]} are outside the checkpoint's "
                          f"{num_classes} classes")
  return np.asarray(rows)


def convert(path: str, *, variant: str | None = None, num_classes: int | None = None,
            head_map: str | None = None, num_frames: int = 16, image_size: int = 224,
            seed: int = 0, allow_nonfinite: bool = False
            ) -> tuple[dict[str, Any], dict[str, Any], str]:
  """(params, model spec as a dict, one-paragraph summary) of a PyTorch checkpoint file."""
  tree = torch_checkpoint.load(path)
  raw, where = find_state_dict(tree, path)
  dtypes = sorted({str(v.dtype) for v in raw.values()})
  bad = nonfinite_tensors(raw)
  if bad:
    listed = ", ".join(bad[:SHOWN]) + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    if not allow_nonfinite:
      raise ConversionError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values: "
                            f"{listed}. The checkpoint is corrupt or from a diverged run; pass "
                            "--allow_nonfinite to convert it anyway")
  state = normalize_keys(raw, path)
  arch = infer_architecture(state, path, variant)
  if num_frames % arch["tubelet_size"] or image_size % arch["patch_size"]:
    raise ConversionError(f"{path}: --num_frames {num_frames} must be a multiple of the tubelet "
                          f"size {arch['tubelet_size']} and --image_size {image_size} of the "
                          f"patch size {arch['patch_size']}")
  grid = (num_frames // arch["tubelet_size"]) * (image_size // arch["patch_size"]) ** 2
  notes = fold_extras(state, arch, grid, path)
  if bad:
    notes.insert(0, f"warning: {len(bad)} tensor(s) hold NaN or infinite values, converted as "
                    f"they are (--allow_nonfinite): {listed}")
  check_tensors(state, arch, path)
  params = to_flax(state, arch)

  classes = arch["num_classes"]
  if head_map is not None:
    rows = read_head_map(head_map, classes)
    head = params["head"]
    params["head"] = {"kernel": head["kernel"][:, rows], "bias": head["bias"][rows]}
    notes.append(f"head rows selected by {head_map}: {classes} → {len(rows)} classes")
    classes = len(rows)
  if num_classes is not None and num_classes != classes:
    key = jax.random.PRNGKey(seed)
    kernel = (vit.trunc_normal(key, (arch["width"], num_classes))
              * vit.VisionTransformer.head_init_scale)
    params["head"] = {"kernel": np.asarray(kernel), "bias": np.zeros(num_classes, np.float32)}
    notes.append(f"head re-initialised for fine-tuning: {classes} → {num_classes} classes")
    classes = num_classes

  name = next((n for n, spec in vit.VARIANTS.items() if spec == (
      arch["width"], arch["depth"], arch["num_heads"], arch["mlp_dim"], arch["patch_size"])),
              None)
  config = vit.ModelSpec.from_dict(dict(arch, num_classes=classes, num_frames=num_frames,
                                        image_size=image_size), path).to_dict()
  count = sum(v.size for v in jax.tree_util.tree_leaves(params))
  summary = (f"{path}: VideoMAE-2 ViT {name or 'custom'} (width {arch['width']}, depth "
             f"{arch['depth']}, {arch['num_heads']} heads, MLP {arch['mlp_dim']}, patch "
             f"{arch['patch_size']}, tubelet {arch['tubelet_size']}), {count / 1e6:.1f}M "
             f"parameters, {classes} classes; weights found under '{where}', converted from "
             f"{'/'.join(dtypes)} to float32")
  return params, config, "\n".join([summary] + [f"  {n}" for n in notes])


def write_model(output: str, params: dict[str, Any], config: dict[str, Any]) -> None:
  """Writes the model directory so that it appears complete or not at all: when two converts
  race to one path, the last to finish replaces the other's complete model, never mixes."""
  target = pathlib.Path(output).absolute()
  target.parent.mkdir(parents=True, exist_ok=True)
  for attempt in range(3):
    try:
      with files.atomic_directory(target) as staging:
        staging.rmdir()  # save_model stages its own copy and renames it onto this fresh name
        checkpoint.save_model(staging, params, config)
      return
    except OSError:  # the final rename lost a race to another writer's: try again on top
      if attempt == 2 or not target.is_dir():
        raise


def check_arguments(args: argparse.Namespace) -> None:
  """Refuses bad paths before any work: the input must be a file, the output new."""
  for flag, path in (("--input", args.input), ("--head_map", args.head_map)):
    if path is not None and not os.path.isfile(path):
      raise ConversionError(f"{flag} {path}: " + (
          "is a directory, not a file" if os.path.isdir(path) else "no such file"))
  output = pathlib.Path(args.output)
  if os.path.lexists(output):
    kind = "directory" if output.is_dir() else "file"
    raise ConversionError(f"--output {output} already exists (a {kind}); choose a new "
                          "directory name")
  parent = output.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ConversionError(f"--output {output}: {parent} is a file, not a directory")


def positive_int(text: str) -> int:
  value = int(text) if text.strip().isdigit() else 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad argument is one `error: …` line naming it, not a usage dump."""

  def error(self, message: str):
    sys.exit(f"error: {message} (see --help)")


def main(argv: list[str] | None = None) -> None:
  parser = ArgumentParser(prog="python -m rlt_jax.convert", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="PyTorch .pth checkpoint")
  parser.add_argument("--output", required=True, help="new directory for the rlt_jax model")
  parser.add_argument("--variant", choices=sorted(vit.VARIANTS),
                      help="architecture name; needed only for a non-standard width")
  parser.add_argument("--num_classes", type=positive_int,
                      help="re-initialise the head for N classes")
  parser.add_argument("--head_map", help="JSON list of head rows to keep (e.g. K710→K400)")
  parser.add_argument("--num_frames", type=positive_int, default=16)
  parser.add_argument("--image_size", type=positive_int, default=224)
  parser.add_argument("--seed", type=int, default=0, help="for a re-initialised head")
  parser.add_argument("--allow_nonfinite", action="store_true",
                      help="convert even if weights hold NaN or ±inf (refused by default: such "
                      "a checkpoint is corrupt or from a diverged run). Use it to inspect such a "
                      "run, or when the affected tensors are replaced anyway (--num_classes, "
                      "--head_map); a warning names them")
  args = parser.parse_args(argv)
  try:
    check_arguments(args)
    params, config, summary = convert(
        args.input, variant=args.variant, num_classes=args.num_classes, head_map=args.head_map,
        num_frames=args.num_frames, image_size=args.image_size, seed=args.seed,
        allow_nonfinite=args.allow_nonfinite)
    write_model(args.output, params, config)
  except (ValueError, OSError) as e:  # CheckpointError and ConversionError are ValueErrors
    sys.exit(f"error: {e}")
  print(summary)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
