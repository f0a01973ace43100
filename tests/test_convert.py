"""convert.py + torch_checkpoint.py: official checkpoints, read safely and exactly."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rlt_jax import checkpoint, convert, rlt, torch_checkpoint
from rlt_jax.models import vit
from torch_files import write_hostile, write_pth

TOL = 5e-5  # fixture README: every correct fp32 implementation is within 2e-6


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  data = np.load(fixtures_dir / "videomae2_tiny_expected.npz")
  state = torch_checkpoint.load(fixtures_dir / "videomae2_tiny.pth")["module"]
  return {"path": str(fixtures_dir / "videomae2_tiny.pth"), "state": state,
          **{k: data[k] for k in ("frames", "logits", "logits_rlt", "mask")}}


def logits(params, config, frames, **tokenizer):
  model = checkpoint.build_model(config, tokenizer=rlt.TokenizerConfig(**tokenizer))
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(model.apply)({"params": params}, frames).logits)


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
    for layout in (dict(capacity=1024), dict(packing=True, row_length=1568, num_rows=1)):
      kept = logits(params, config, fixture["frames"], policy="rlt", **layout)
      assert np.abs(kept - fixture["logits_rlt"]).max() <= TOL
    assert full.argmax(-1).tolist() == [174, 399]

  def test_cli_writes_a_model_that_loads(self, fixture, tmp_path, capsys):
    out = tmp_path / "model"
    convert.main(["--input", fixture["path"], "--output", str(out)])
    assert "4.3M parameters, 400 classes" in capsys.readouterr().out
    config, params = checkpoint.load_model(out)
    assert np.abs(logits(params, config, fixture["frames"]) - fixture["logits"]).max() <= TOL
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
      key = key.replace("head.", "cls_head.fc_cls.") if key.startswith("head.") else "backbone." + key
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
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

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
