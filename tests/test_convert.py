"""convert.py + torch_checkpoint.py: official checkpoints, read safely and exactly."""

import argparse
import json
import os
import pathlib
import re
import threading
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rlt_jax import convert, layout, rlt
from rlt_jax.checkpoints import checkpoint, torch_checkpoint
from rlt_jax.models import vit
from rlt_jax.runtime import files
from rlt_jax.training import forward
from torch_files import PlainArray, View, laughs, text, write_hostile, write_pth, write_raw

TOL = 5e-5  # fixture README: every correct fp32 implementation is within 2e-6


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  data = np.load(fixtures_dir / "videomae2_tiny_expected.npz")
  state = torch_checkpoint.load(fixtures_dir / "videomae2_tiny.pth")["module"]
  return {"path": str(fixtures_dir / "videomae2_tiny.pth"), "state": state,
          **{k: data[k] for k in ("frames", "logits", "logits_rlt", "mask")}}


def logits(params, spec, frames, policy="none", kind="stream"):
  spec = spec if isinstance(spec, vit.ModelSpec) else vit.ModelSpec.from_dict(spec)
  run = forward.Forward(vit.build(spec), rlt.Policy(policy), layout.Layout(kind))
  with jax.default_matmul_precision("highest"):
    return np.asarray(run(params, frames)[0])


def assert_same_params(a, b):
  flat_a, flat_b = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=str(path))


class TestOfficialLayout:

  def test_reader_keeps_the_stored_float16_values(self, fixture):
    assert len(fixture["state"]) == 32
    assert {v.dtype for v in fixture["state"].values()} == {np.dtype(np.float16)}
    assert fixture["state"]["patch_embed.proj.weight"].shape == (384, 3, 2, 16, 16)

  def test_reproduces_upstream_logits_with_and_without_rlt(self, fixture):
    params, config, summary = convert.convert(fixture["path"])
    assert config["width"] == 384 and config["depth"] == 2 and config["num_heads"] == 6
    assert "float16" in summary and "'module'" in summary
    full = logits(params, config, fixture["frames"])
    assert np.abs(full - fixture["logits"]).max() <= TOL
    for kind in ("padded", "stream"):
      kept = logits(params, config, fixture["frames"], policy="rlt", kind=kind)
      assert np.abs(kept - fixture["logits_rlt"]).max() <= TOL
    assert full.argmax(-1).tolist() == [174, 399]

  def test_cli_writes_a_model_that_loads(self, fixture, tmp_path, capsys):
    out = tmp_path / "model"
    convert.main(["--input", fixture["path"], "--output", str(out)])
    assert "4.3M parameters, 400 classes" in capsys.readouterr().out
    spec, params = checkpoint.load_model(out)
    assert np.abs(logits(params, spec, fixture["frames"]) - fixture["logits"]).max() <= TOL
    with pytest.raises(SystemExit, match="already exists"):
      convert.main(["--input", fixture["path"], "--output", str(out)])


class TestSafety:

  @pytest.mark.parametrize("legacy", [False, True])
  def test_a_hostile_pickle_is_refused_and_nothing_runs(self, tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_hostile(path, marker, legacy=legacy)
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match=r"system"):
      torch_checkpoint.load(path)
    with pytest.raises(SystemExit, match="refused and nothing in it was run"):
      convert.main(["--input", str(path), "--output", str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

  def test_not_a_checkpoint(self, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
      torch_checkpoint.load(path)


class TestLayouts:

  @pytest.fixture(scope="class")
  def reference(self, fixture):
    return convert.convert(fixture["path"])[0]

  @pytest.mark.parametrize("wrap,prefix,dtype,legacy", [
      ("model", "", np.float16, False),
      ("state_dict", "_orig_mod.", np.float16, False),
      (None, "module.backbone.", np.float16, False),
      ("module", "encoder.", ml_dtypes.bfloat16, False),
      ("model", "", np.float32, True),
  ])
  def test_wrappers_prefixes_dtypes_and_legacy_files(self, fixture, reference, tmp_path, wrap,
                                                     prefix, dtype, legacy):
    state = {prefix + k: v.astype(dtype) for k, v in fixture["state"].items()}
    tree = state if wrap is None else {wrap: state, "epoch": 3, "args": {"lr": 1e-3}}
    path = tmp_path / "ckpt.pth"
    write_pth(path, tree, legacy=legacy)
    params, _, _ = convert.convert(str(path))
    if dtype == ml_dtypes.bfloat16:  # bf16 rounding of the fp16 weights, then exact
      reference = jax.tree_util.tree_map(
          lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), reference)
    assert_same_params(params, reference)

  def test_mmaction2_layout_with_its_stored_pos_embed(self, fixture, reference, tmp_path):
    renames = {"patch_embed.proj.": "patch_embed.projection.", ".mlp.fc1.": ".mlp.layers.0.0.",
               ".mlp.fc2.": ".mlp.layers.1."}
    state = {}
    for key, value in fixture["state"].items():
      for old, new in renames.items():
        key = key.replace(old, new)
      key = (key.replace("head.", "cls_head.fc_cls.") if key.startswith("head.")
             else "backbone." + key)
      state[key] = value
    state["backbone.pos_embed"] = vit.sinusoid_table(1568, 384)[None]
    path = tmp_path / "mmaction.pth"
    write_pth(path, {"meta": {"epoch": 1}, "state_dict": state})
    params, _, summary = convert.convert(str(path))
    assert "checked the stored pos_embed" in summary
    assert_same_params(params, reference)

    state["backbone.pos_embed"] = state["backbone.pos_embed"] + 0.01
    write_pth(path, {"state_dict": state})
    with pytest.raises(convert.ConversionError, match="differs from the fixed sin/cos table"):
      convert.convert(str(path))

  def test_layer_scale_is_folded_exactly(self, fixture, tmp_path):
    with_gamma = dict(fixture["state"])
    doubled = {k: v.astype(np.float32) for k, v in fixture["state"].items()}
    for i in range(2):
      with_gamma[f"blocks.{i}.gamma_1"] = np.full(384, 2.0, np.float16)
      with_gamma[f"blocks.{i}.gamma_2"] = np.full(384, 0.5, np.float16)
      for name, g in (("attn.proj", 2.0), ("mlp.fc2", 0.5)):
        for p in ("weight", "bias"):
          doubled[f"blocks.{i}.{name}.{p}"] = doubled[f"blocks.{i}.{name}.{p}"] * g
    write_pth(tmp_path / "a.pth", {"module": with_gamma})
    write_pth(tmp_path / "b.pth", {"module": doubled})
    a, _, summary = convert.convert(str(tmp_path / "a.pth"))
    b, _, _ = convert.convert(str(tmp_path / "b.pth"))
    assert "layer scale" in summary
    assert_same_params(a, b)


class TestHead:

  def test_head_map_selects_rows(self, fixture, tmp_path):
    rows = [399, 0, 174, 54]
    (tmp_path / "map.json").write_text(json.dumps(rows))
    params, config, _ = convert.convert(fixture["path"], head_map=str(tmp_path / "map.json"))
    assert config["num_classes"] == 4
    out = logits(params, config, fixture["frames"])
    np.testing.assert_allclose(out, fixture["logits"][:, rows], atol=TOL)

  def test_bad_head_maps_are_named(self, fixture, tmp_path):
    (tmp_path / "map.json").write_text("[1, 400]")
    with pytest.raises(convert.ConversionError, match=r"map.json: indices \[400\]"):
      convert.convert(fixture["path"], head_map=str(tmp_path / "map.json"))
    (tmp_path / "map.json").write_text('{"a": 1}')
    with pytest.raises(convert.ConversionError, match="JSON list of ints"):
      convert.convert(fixture["path"], head_map=str(tmp_path / "map.json"))

  def test_num_classes_reinitialises_only_the_head(self, fixture):
    params, config, summary = convert.convert(fixture["path"], num_classes=174)
    reference = convert.convert(fixture["path"])[0]
    assert params["head"]["kernel"].shape == (384, 174) and config["num_classes"] == 174
    assert np.abs(params["head"]["kernel"]).max() < 1e-4 and "re-initialised" in summary
    assert_same_params({k: v for k, v in params.items() if k != "head"},
                       {k: v for k, v in reference.items() if k != "head"})


class TestRefusals:

  def refuse(self, state, tmp_path, match, **kw):
    path = tmp_path / "bad.pth"
    write_pth(path, {"module": state})
    with pytest.raises(convert.ConversionError, match=match):
      convert.convert(str(path), **kw)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
      convert.main(["--input", str(path), "--output", str(out)] +
                   [f"--{k}={v}" for k, v in kw.items()])
    assert not out.exists() and not list(tmp_path.glob(".out*"))

  def test_pretraining_checkpoint(self, fixture, tmp_path):
    state = {"encoder." + k: v for k, v in fixture["state"].items() if not k.startswith("head")}
    state["decoder.blocks.0.norm1.weight"] = np.ones(192, np.float16)
    state["mask_token"] = np.zeros((1, 1, 192), np.float16)
    self.refuse(state, tmp_path, "pre-training checkpoint")

  def test_every_missing_unused_and_misshapen_key_is_listed(self, fixture, tmp_path):
    state = dict(fixture["state"])
    del state["blocks.1.attn.v_bias"]
    state["blocks.0.attn.relative_position_bias_table"] = np.zeros((10, 6), np.float16)
    state["fc_norm.bias"] = np.zeros(385, np.float16)
    self.refuse(state, tmp_path, r"3 problem\(s\):\n  missing blocks.1.attn.v_bias: expected "
                r"shape \(384,\)\n  unused blocks.0.attn.relative_position_bias_table: shape "
                r"\(10, 6\)\n  wrong shape fc_norm.bias: expected \(384,\), found \(385,\)")

  def test_cls_token_models(self, fixture, tmp_path):
    state = {k.replace("fc_norm", "norm"): v for k, v in fixture["state"].items()}
    self.refuse(state, tmp_path, "CLS-token model")

  def test_variant_must_match_the_tensors(self, fixture, tmp_path):
    self.refuse(dict(fixture["state"]), tmp_path, "does not match the tensors", variant="B/16")

  def test_non_standard_width_needs_a_variant(self, tmp_path):
    d = 96
    state = {"patch_embed.proj.weight": np.zeros((d, 3, 2, 16, 16), np.float16),
             "blocks.0.mlp.fc1.weight": np.zeros((4 * d, d), np.float16),
             "head.weight": np.zeros((5, d), np.float16)}
    self.refuse(state, tmp_path, "pass --variant")


def assert_refused(path, match, tmp_path, **limits):
  """load refuses with one line naming the file; convert says `error: …` and writes nothing."""
  with pytest.raises(torch_checkpoint.CheckpointError, match=match) as refusal:
    torch_checkpoint.load(path, torch_checkpoint.Limits(**limits))
  assert str(refusal.value).startswith(str(path)) and "\n" not in str(refusal.value)
  if not limits:
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(path))}"):
      convert.main(["--input", str(path), "--output", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


FLOATS = np.arange(12, dtype=np.float32)


class TestViews:
  """Every tensor view is checked against its storage before a byte is read through it."""

  @pytest.mark.parametrize("legacy", [False, True])
  @pytest.mark.parametrize("view,data,match", [
      (View("0", 4, 0, (65536, 1), (1, 1)), 4, r"tensor 'module/head.weight' views storage '0' "
       r"\(4 float32 elements\) at offset 0 with size \(65536, 1\) and stride \(1, 1\): its "
       r"farthest element 65,535 lies outside"),
      (View("0", 4, 0, (2,), (2 ** 40,)), 4, r"stride \(1099511627776,\): its farthest element"),
      (View("0", 4, -1, (2,), (1,)), 4, r"at offset -1 .*: negative offset, size or stride"),
      (View("0", 4, 0, (-1, -2), (1, 1)), 4, r"size \(-1, -2\) .*negative"),
      (View("0", 4, 0, (2,), (-1,)), 4, r"stride \(-1,\): negative"),
      (View("0", 4, 5, (0,), (1,)), 4, r"at offset 5 .*offset lies outside"),
      (View("0", 8, 0, (8,), (1,)), 4, r"storage '0' \(8 float32 elements\)"),  # shrunken data
      (View("0", 2 ** 60, 0, (2,), (1,)), 4, r"storage '0' \(1,152,921,504,606,846,976 float32"),
      (View("0", -4, 0, (2,), (1,)), 4, r"storage '0' has a negative element count -4"),
      (View("0", 2, 0, (2,), (1,), "ComplexFloatStorage"), 4,
       r"unsupported storage type torch.ComplexFloatStorage"),
  ])
  def test_views_outside_their_storage_are_refused(self, tmp_path, legacy, view, data, match):
    path = tmp_path / "bad.pth"
    write_pth(path, {"module": {"head.weight": view}}, legacy=legacy,
              storages={"0": FLOATS[:data].tobytes()})
    assert_refused(path, match, tmp_path)

  @pytest.mark.parametrize("legacy", [False, True])
  def test_valid_views_and_shared_tensors_load_exactly(self, tmp_path, legacy):
    strided = lambda offset, size, stride: np.lib.stride_tricks.as_strided(
        FLOATS[offset:], size, [4 * s for s in stride])
    shared = View("0", 12, 2, (2, 3), (3, 1))
    views = {"block": shared, "again": shared, "transposed": View("0", 12, 0, (3, 2), (1, 3)),
             "scalar": View("0", 12, 11), "empty": View("0", 12, 12, (0, 4), (4, 1)),
             "rows": View("0", 12, 5, (3, 2), (0, 1)),
             "unit": View("0", 12, 3, (1, 2), (2 ** 62, 1))}  # a size-1 dimension's stride
    path = tmp_path / "views.pth"
    write_pth(path, {"model": views, "model_ema": views}, legacy=legacy,
              storages={"0": FLOATS.tobytes()})
    tree = torch_checkpoint.load(path)
    got = tree["model"]
    assert tree["model_ema"] is got and got["block"] is got["again"]
    np.testing.assert_array_equal(got["block"], strided(2, (2, 3), (3, 1)))
    np.testing.assert_array_equal(got["transposed"], FLOATS[:6].reshape(2, 3).T)
    assert got["scalar"].shape == () and got["scalar"] == 11
    assert got["empty"].shape == (0, 4) and got["empty"].dtype == np.float32
    np.testing.assert_array_equal(got["rows"], [[5, 6]] * 3)
    np.testing.assert_array_equal(got["unit"], [[3, 4]])


def bomb(name):
  """Small hand-made pickles that cost a naive reader exponential time, or its stack."""
  t59 = b"\x80\x02" + laughs(59) + b"0"  # leaves nothing on the stack; memo 59 holds t_59
  get = b"h" + bytes([59])
  return {
      "laughs": t59 + b"}" + text("module") + get + b"s.",
      "hashed as a dict key": t59 + b"}" + text("module") + b"}" + get + b"K\x01ss.",
      "hashed in a set": t59 + b"c__builtin__\nset\n]" + get + b"a\x85R.",
      "hashed in a protocol-4 set": t59 + b"\x8f(" + get + b"\x90.",
      "nested 5000 deep": b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".",
      "contains itself": b"\x80\x02]q\x00h\x00a.",
  }[name]


class TestBombs:
  """Files built to exhaust time, memory or the stack are refused within a second."""

  @pytest.mark.parametrize("legacy", [False, True])
  @pytest.mark.parametrize("name,match", [
      ("laughs", "more than 10,000,000 values to visit"),
      ("hashed as a dict key", "a dict key or set member of more than 64 values"),
      ("hashed in a set", "a dict key or set member of more than 64 values"),
      ("hashed in a protocol-4 set", "a dict key or set member of more than 64 values"),
      ("nested 5000 deep", "nested more than 100 levels deep"),
      ("contains itself", "'0' contains itself"),
  ])
  def test_pickle_bombs_are_refused_quickly(self, tmp_path, legacy, name, match):
    path = tmp_path / "bomb.pth"
    write_raw(path, bomb(name), legacy=legacy)
    start = time.perf_counter()
    with pytest.raises(torch_checkpoint.CheckpointError, match=match):
      torch_checkpoint.load(path)
    assert time.perf_counter() - start < 1

  def test_zero_strides_cannot_blow_a_view_up(self, tmp_path):
    path = tmp_path / "stretch.pth"  # one float seen as 1 GiB
    write_pth(path, {"module": {"head.weight": View("0", 1, 0, (2 ** 26, 4), (0, 0))}},
              storages={"0": FLOATS[:1].tobytes()})
    assert_refused(path, r"tensor 'module/head.weight' brings the data held to 1,073,74\d,\d\d\d "
                   r"bytes, more than 67,108,864", tmp_path)

  def test_limits_on_tensors_and_values(self, fixture, tmp_path):
    path = tmp_path / "three.pth"
    write_pth(path, {"module": {k: np.zeros(2, np.float16) for k in "abc"}})
    assert_refused(path, "more than 2 tensors; refused", tmp_path, max_tensors=2)
    assert_refused(path, "more than 5 values to visit", tmp_path, max_objects=5)
    assert_refused(fixture["path"], "more than 1 levels deep", tmp_path, max_depth=1)
    # 4 dict keys hashed + 2 dicts and 3 tensors visited; tensors are 2 levels down
    torch_checkpoint.load(path, torch_checkpoint.Limits(max_objects=9, max_depth=2, max_tensors=3))


class TestDamagedFiles:
  """Each kind of damage is one clear line naming the file, and a clean `error:` exit."""

  def test_truncated_zip(self, fixture, tmp_path):
    path = tmp_path / "cut.pth"
    data = pathlib.Path(fixture["path"]).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert_refused(path, "a truncated or damaged zip archive", tmp_path)

  def test_bad_crc(self, fixture, tmp_path):
    path = tmp_path / "flipped.pth"
    data = bytearray(pathlib.Path(fixture["path"]).read_bytes())
    with zipfile.ZipFile(fixture["path"]) as archive:
      record = next(i for i in archive.infolist() if "/data/" in i.filename)
    start = record.header_offset + 30 + len(record.filename) + len(record.extra)
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_refused(path, f"a damaged zip archive .*Bad CRC-32 for file '{record.filename}'",
                   tmp_path)

  def test_missing_data_record(self, tmp_path):
    path = tmp_path / "missing.pth"
    write_pth(path, {"module": {"head.weight": View("w", 4, 0, (4,), (1,))}})
    assert_refused(path, r"no data record archive/data/w for storage 'w' \(4 float32", tmp_path)

  def test_truncated_legacy_file(self, fixture, tmp_path):
    path = tmp_path / "legacy.pth"
    write_pth(path, {"model": fixture["state"]}, legacy=True)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert_refused(path, r"truncated: storage '31' \(400 float16 elements\) needs 800 bytes, the "
                   "file has 790 left", tmp_path)
    path.write_bytes(data[:200])
    assert_refused(path, "truncated, the data ends early", tmp_path)

  @pytest.mark.parametrize("payload,match", [
      (b"P\xe9\n.", "persistent IDs in protocol 0 must be ASCII strings"),
      (b"\x80\x02\xff.", "an unknown opcode"),
      (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.", "malformed checkpoint .*TypeError"),
      (b"\x80\x02P0\n.", r"unexpected persistent id \(a str\)"),
  ])
  def test_malformed_pickles(self, tmp_path, payload, match):
    path = tmp_path / "odd.pth"
    write_raw(path, payload)
    assert_refused(path, match, tmp_path)


class TestDataForms:
  """What torch.save writes beside the weights (args, sets, numpy scalars) loads in every
  pickle protocol; the globals that allow it cannot be abused."""

  @pytest.mark.parametrize("protocol", [2, 3, 4])
  def test_sets_numpy_scalars_and_namespaces(self, fixture, tmp_path, protocol):
    args = argparse.Namespace(lr=1e-3, tags={"k400", "ft"}, frozen=frozenset({1, 2}),
                              best=np.float64(81.5), epoch=np.int64(3),
                              big=np.dtype(">f4").type(2.5),
                              dtype=np.dtype("float16"), empty=b"", blob=b"\x00\xff")
    path = tmp_path / "full.pth"
    write_pth(path, {"model": fixture["state"], "args": args, "sizes": (1, 2),
                     "mean": PlainArray(np.asfortranarray(np.arange(6.0).reshape(2, 3)))},
              protocol=protocol)
    tree = torch_checkpoint.load(path)
    assert tree["args"] == vars(args) and isinstance(tree["args"], torch_checkpoint.Namespace)
    assert type(tree["args"]["best"]) is np.float64 and type(tree["args"]["tags"]) is set
    assert tree["args"]["big"] == 2.5 and tree["sizes"] == (1, 2)
    np.testing.assert_array_equal(tree["mean"], np.arange(6.0).reshape(2, 3))
    assert convert.find_state_dict(tree, str(path))[1] == "model"

  @pytest.mark.parametrize("payload,match", [
      (b"c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.", "TypeError"),  # bytes(2**30)
      (b"c_codecs\nencode\n" + text("abc") + text("utf-16") + b"\x86R.", "only for a str and"),
      (b"cnumpy\ndtype\n" + text("O") + b"\x85R.", "numpy dtype 'O' is not a plain number type"),
      (b"cnumpy\ndtype\n" + text("f8,f8") + b"\x85R.", "not a plain number type"),
      (b"ctorch._utils\n_rebuild_tensor_v2\nN}" + text("__defaults__") + b"Ns\x86b.",
       "object state set on a method"),
      (b"ccollections\nOrderedDict\n]\x85R.", "TypeError"),
      (b"]K\x00K\x01s.", "dict items added to a list"),
      (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x01K"
       b"\x04\x85cnumpy\ndtype\n" + text("f4") + b"\x85R\x89C\x04abcdtb.",
       r"numpy array of shape \(4,\) and dtype float32 with 4 bytes"),
  ])
  def test_allowed_globals_check_their_arguments(self, tmp_path, payload, match):
    path = tmp_path / "abuse.pth"
    write_raw(path, b"\x80\x03" + payload)
    assert_refused(path, match, tmp_path)


class TestNonfinite:

  def test_nan_and_inf_are_refused_unless_allowed(self, fixture, tmp_path, capsys):
    state = dict(fixture["state"])
    state["blocks.0.norm1.weight"] = np.where(np.arange(384) == 7, np.nan, 1).astype(np.float16)
    state["head.bias"] = np.full(400, np.inf, np.float16)
    path, out = tmp_path / "diverged.pth", tmp_path / "out"
    write_pth(path, {"module": state})
    with pytest.raises(convert.ConversionError, match=r"2 tensor\(s\) hold NaN or infinite values: "
                       r"blocks.0.norm1.weight, head.bias.*--allow_nonfinite"):
      convert.convert(str(path))
    with pytest.raises(SystemExit, match="^error: .*hold NaN or infinite values"):
      convert.main(["--input", str(path), "--output", str(out)])
    assert not out.exists()
    convert.main(["--input", str(path), "--output", str(out), "--allow_nonfinite"])
    assert "warning: 2 tensor(s) hold NaN or infinite values" in capsys.readouterr().out
    _, params = checkpoint.load_model(out)
    assert np.isinf(params["head"]["bias"]).all()


class TestCommandLine:

  @pytest.mark.parametrize("change,match", [
      ({"--input": "{tmp}/nothing.pth"}, "--input .*/nothing.pth: no such file"),
      ({"--input": "{tmp}"}, "--input .*: is a directory, not a file"),
      ({"--output": "{tmp}/file.txt"}, "--output .*/file.txt already exists \\(a file\\)"),
      ({"--output": "{tmp}/file.txt/model"}, "--output .*/file.txt/model: .*/file.txt is a file"),
      ({"--output": "{tmp}"}, "already exists \\(a directory\\)"),
      ({"--head_map": "{tmp}/none.json"}, "--head_map .*/none.json: no such file"),
      ({"--variant": "Q/9"}, "argument --variant: invalid choice: 'Q/9'"),
      ({"--num_classes": "0"}, "argument --num_classes: expected a positive integer, got '0'"),
      ({"--num_classes": "-3"}, "argument --num_classes: expected a positive integer, got '-3'"),
      ({"--num_frames": "many"}, "argument --num_frames: expected a positive integer, got 'many'"),
      ({"--image_size": "0"}, "argument --image_size: expected a positive integer"),
  ])
  def test_bad_arguments_are_one_line_before_any_work(self, fixture, tmp_path, monkeypatch,
                                                       change, match):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(torch_checkpoint, "load", lambda *a: pytest.fail("work was started"))
    argv = {"--input": fixture["path"], "--output": str(tmp_path / "out")}
    argv |= {k: v.format(tmp=tmp_path) for k, v in change.items()}
    with pytest.raises(SystemExit) as exit:
      convert.main([x for kv in argv.items() for x in kv])
    assert str(exit.value.code).startswith("error: ") and "\n" not in str(exit.value.code)
    assert re.search(match, str(exit.value.code))
    assert not (tmp_path / "out").exists()

  def test_tubelet_must_divide_the_frames(self, fixture):
    with pytest.raises(convert.ConversionError, match="--num_frames 15 must be a multiple of the "
                       "tubelet size 2"):
      convert.convert(fixture["path"], num_frames=15)


class TestRace:

  def test_racing_converts_leave_one_complete_model(self, fixture, tmp_path, monkeypatch, capsys):
    """Both finish; the directory is one of the two models, whole, and nothing is left over."""
    out, results = tmp_path / "model", {}
    start, staged = threading.Barrier(2), threading.Barrier(2)
    write, publish, one_writer = checkpoint._write_params, files.publish_directory, threading.Lock()

    def write_alone(*args):  # orbax's writes one at a time: what races here is the publishing
      with one_writer:
        write(*args)

    def meet_then_publish(*args):  # both staged before either renames: the renames race
      staged.wait(timeout=120)
      publish(*args)

    monkeypatch.setattr(checkpoint, "_write_params", write_alone)
    monkeypatch.setattr(files, "publish_directory", meet_then_publish)

    def run(classes):
      start.wait()
      try:
        convert.main(["--input", fixture["path"], "--output", str(out),
                      "--num_classes", str(classes)])
        results[classes] = "ok"
      except BaseException as e:  # noqa: B036 (reported below)
        results[classes] = repr(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in (10, 20)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert results == {10: "ok", 20: "ok"}
    spec, params = checkpoint.load_model(out)  # checks params against model.json
    assert spec.num_classes in (10, 20)
    assert params["head"]["kernel"].shape == (384, spec.num_classes)
    assert sorted(os.listdir(tmp_path)) == ["model"]
