"""models/vit.py: VideoMAE-2 math over a TokenBatch, the ModelSpec, and run-time options.

The math is checked against an independent float64 NumPy forward and against the upstream
PyTorch logits of a converted checkpoint (tests/fixtures); run-time options (remat, ToMe with
nothing to merge, the layout) must not change the logits.
"""

import dataclasses
import json
from math import erf

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax import convert, layout, rlt
from rlt_jax.checkpoints import checkpoint
from rlt_jax.models import tome, vit
from rlt_jax.training import forward
from test_layout import SPEC, N, clips, full_tokens, logits_alone, random_params, run

TS, P = SPEC.tubelet_size, SPEC.patch_size
TOL = 5e-5  # fixture README: every correct fp32 implementation is within 2e-6


def numpy_forward(params, frames, mask=None, spec=SPEC):
  """VideoMAE-2 forward in float64 NumPy, written from docs/videomae2.md, on each clip's
  tokens where `mask` (B, N) is True (all tokens by default), one clip at a time."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(rlt.normalize(np.asarray(frames)), np.float64)
  b, t, hh, ww, _ = x.shape
  ts, ps = spec.tubelet_size, spec.patch_size
  patches = x.reshape(b, t // ts, ts, hh // ps, ps, ww // ps, ps, 3)
  patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, spec.num_tokens, -1)
  kernel = p["patch_embed"]["kernel"]
  tokens = patches @ kernel.reshape(-1, kernel.shape[-1]) + p["patch_embed"]["bias"]
  d = tokens.shape[-1]
  j = np.arange(d)
  angle = np.arange(spec.num_tokens)[:, None] / 10000 ** (2 * (j // 2) / d)
  tokens = tokens + np.where(j % 2 == 0, np.sin(angle), np.cos(angle))

  def norm(v, q):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

  gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
  out = []
  for clip in range(b):
    h_all = tokens[clip] if mask is None else tokens[clip][np.asarray(mask[clip])]
    h_all = h_all[None]
    for i in range(spec.depth):
      blk = p[f"blocks_{i}"]
      h = norm(h_all, blk["norm1"])
      q, k, v = np.split(h @ blk["attn"]["qkv"]["kernel"], 3, axis=-1)
      q, v = q + blk["attn"]["q_bias"], v + blk["attn"]["v_bias"]
      split = lambda z: z.reshape(*z.shape[:2], spec.num_heads, -1).transpose(0, 2, 1, 3)
      q, k, v = split(q), split(k), split(v)
      a = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
      a = np.exp(a - a.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      o = (a @ v).transpose(0, 2, 1, 3).reshape(h_all.shape)
      h_all = h_all + o @ blk["attn"]["proj"]["kernel"] + blk["attn"]["proj"]["bias"]
      h = norm(h_all, blk["norm2"])
      h = gelu(h @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"])
      h_all = h_all + h @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
    pooled = norm(h_all.mean(1), p["fc_norm"])
    out.append((pooled @ p["head"]["kernel"] + p["head"]["bias"])[0])
  return np.stack(out)


@pytest.fixture(scope="module")
def params():
  return random_params(SPEC)


def rlt_mask(frames):
  return rlt.select(rlt.normalize(jnp.asarray(frames)), rlt.Policy("rlt"), tubelet_size=TS,
                    patch_size=P)


def batch_logits(model, params, frames, mask, kind="stream"):
  plan = layout.plan(np.asarray(mask.sum(-1)), layout.Layout(kind, capacity_step=8),
                     num_tokens=N, groups=1)
  return np.asarray(run(model, params, rlt.normalize(jnp.asarray(frames)), mask, plan))


def stream_with_length_embedding():
  """(spec, random params, tokens): four clips in a stream with padding, length embedding on."""
  spec = dataclasses.replace(SPEC, length_embedding=True)
  frames = rlt.normalize(jnp.asarray(clips(batch=4)))
  mask = rlt_mask(clips(batch=4))
  plan = layout.plan(np.asarray(mask.sum(-1)), layout.Layout("stream", capacity_step=8),
                     num_tokens=N, groups=2)
  tokens = layout.tokenize(frames, mask, plan, tubelet_size=TS, patch_size=P)
  return spec, random_params(spec), tokens


class TestArchitecture:

  @pytest.mark.parametrize("name,millions", [("S/16", 22.0), ("B/16", 86.5), ("L/16", 304.3),
                                             ("H/16", 632.1), ("g/14", 1012.2)])
  def test_variants_have_the_published_sizes(self, name, millions):
    spec = vit.ModelSpec.from_variant(name, num_classes=400, image_size=224)
    shapes = checkpoint.abstract_params(spec)
    count = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
    assert round(count / 1e6, 1) == millions

  def test_vit_g_has_2048_tokens_and_mlp_6144(self):
    spec = vit.ModelSpec.from_variant("g/14", num_classes=400)
    assert spec.num_tokens == 2048 and spec.mlp_dim == 6144 and spec.grid == (8, 16, 16)

  def test_unknown_variant_lists_the_names(self):
    with pytest.raises(ValueError, match="model.variant='X/16'.*B/16"):
      vit.ModelSpec.from_variant("X/16", num_classes=1)

  def test_sinusoid_table_is_the_upstream_one(self, fixtures_dir):
    want = np.load(fixtures_dir / "videomae2_tiny_expected.npz")["pos_table"]
    np.testing.assert_array_equal(vit.sinusoid_table(1568, 384), want)

  def test_every_layer_norm_uses_eps_1e6(self, params):
    """(The logits cannot tell 1e-5 from 1e-6 apart: 7e-6 on the fixture.) Every LayerNorm
    the model runs, two per block and fc_norm, is built with eps 1e-6."""
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__":
        seen.append(context.module.epsilon)
      return next_fun(*args, **kwargs)

    tokens = full_tokens(rlt.normalize(jnp.asarray(clips(batch=1))))
    with nn.intercept_methods(record):
      jax.eval_shape(lambda t: vit.build(SPEC).apply({"params": params}, t), tokens)
    assert seen == [1e-6] * (2 * SPEC.depth + 1)

  def test_matches_an_independent_float64_forward(self, params):
    model, frames = vit.build(SPEC), clips(batch=4)
    got = batch_logits(model, params, frames, jnp.ones((4, N), bool), "padded")
    np.testing.assert_allclose(got, numpy_forward(params, frames), atol=1e-5, rtol=0)

  def test_kept_tokens_match_the_float64_forward_on_those_tokens_alone(self, params):
    model, frames = vit.build(SPEC), clips(batch=4)
    mask = rlt_mask(frames)
    assert np.asarray(mask.sum(-1)).max() < N
    np.testing.assert_allclose(batch_logits(model, params, frames, mask, "stream"),
                               numpy_forward(params, frames, mask), atol=1e-5, rtol=0)

  def test_videomae2_initialisation(self):
    model = vit.build(SPEC)
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 full_tokens(jnp.zeros((1, 8, 64, 64, 3))))["params"]
    qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert abs(qkv.std() - 0.02) < 0.003 and np.abs(qkv).max() <= 0.04 + 1e-6
    assert np.abs(params["head"]["kernel"]).max() <= 0.04 * 0.001 + 1e-9
    assert (np.asarray(params["blocks_0"]["attn"]["q_bias"]) == 0).all()
    assert (np.asarray(params["fc_norm"]["scale"]) == 1).all()
    bound = (TS * P * P * 3) ** -0.5
    assert np.abs(params["patch_embed"]["kernel"]).max() <= bound
    assert np.abs(params["patch_embed"]["bias"]).max() <= bound


class TestModelSpec:

  def test_round_trips_through_json(self):
    spec = dataclasses.replace(SPEC, length_embedding=True)
    assert vit.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec

  @pytest.mark.parametrize("change,match", [
      (dict(depth=0), r"runs/a/model.json: model.depth=0: expected a positive integer"),
      (dict(width="64"), r"runs/a/model.json: model.width='64'"),
      (dict(num_heads=True), r"runs/a/model.json: model.num_heads=True"),
      (dict(length_embedding=1), r"runs/a/model.json: model.length_embedding=1"),
      (dict(width=65), r"runs/a/model.json: model.width=65 is not divisible by num_heads=2"),
      (dict(num_frames=7), r"runs/a/model.json: model: num_frames=7 must be a multiple"),
      (dict(variant="tiny"), r"runs/a/model.json: unknown model fields \['variant'\]"),
      (dict(num_classes=None), r"runs/a/model.json: .*num_classes"),
  ])
  def test_errors_name_the_source_and_the_field(self, change, match):
    fields = {k: v for k, v in (SPEC.to_dict() | change).items() if v is not None}
    with pytest.raises(ValueError, match=match):
      vit.ModelSpec.from_dict(fields, "runs/a/model.json")

  def test_a_non_object_is_named(self):
    with pytest.raises(ValueError, match="runs/a/model.json: expected a JSON object, got list"):
      vit.ModelSpec.from_dict([1, 2], "runs/a/model.json")

  def test_bad_runtime_settings_name_the_field(self, params):
    with pytest.raises(ValueError, match="model.dtype='float64'"):
      vit.build(SPEC, dtype="float64")
    tokens = full_tokens(jnp.zeros((1, 8, 64, 64, 3)))
    with pytest.raises(ValueError, match="model.remat='some'"):
      jax.eval_shape(lambda t: vit.build(SPEC, remat="some").apply({"params": params}, t),
                     tokens)
    with pytest.raises(ValueError, match="model.tome has 3 entries for 2 blocks"):
      jax.eval_shape(lambda t: vit.build(SPEC, tome=(1, 1, 1)).apply({"params": params}, t),
                     tokens)


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
  """The fixture checkpoint converted, saved as a model directory and loaded back."""
  params, config, _ = convert.convert(str(fixtures_dir / "videomae2_tiny.pth"))
  if not isinstance(config, vit.ModelSpec):
    names = {f.name for f in dataclasses.fields(vit.ModelSpec)}
    config = vit.ModelSpec.from_dict({k: v for k, v in config.items() if k in names})
  directory = tmp_path_factory.mktemp("converted") / "model"
  checkpoint.save_model(directory, params, config)
  spec, params = checkpoint.load_model(directory)
  assert spec == config
  return spec, params, np.load(fixtures_dir / "videomae2_tiny_expected.npz")


class TestConvertedCheckpoint:

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_reproduces_the_upstream_logits_with_and_without_rlt(self, converted, kind):
    spec, params, data = converted
    model = vit.build(spec)
    full, counts, _ = forward.Forward(model, rlt.Policy("none"), layout.Layout(kind))(
        params, data["frames"])
    assert counts.tolist() == [1568, 1568]
    assert np.abs(np.asarray(full) - data["logits"]).max() <= TOL
    assert np.asarray(full).argmax(-1).tolist() == [174, 399]
    kept, counts, plan = forward.Forward(model, rlt.Policy("rlt", threshold=0.1),
                                         layout.Layout(kind))(params, data["frames"])
    assert counts.tolist() == [856, 642] and plan.capacity == 896
    assert np.abs(np.asarray(kept) - data["logits_rlt"]).max() <= TOL
    assert np.asarray(kept).argmax(-1).tolist() == [174, 54]  # dropping tokens changed clip 1


class TestTraining:

  @pytest.fixture(scope="class")
  def gradients(self):
    """Logits and gradients (params, patches) of one training step, per remat policy: four
    clips in a stream with padding, length embedding and drop path on."""
    spec, params, tokens = stream_with_length_embedding()

    @jax.jit
    def step(params, patches):
      out = {}
      for remat in vit.REMAT_POLICIES:
        model = vit.build(spec, remat=remat, drop_path=0.2)

        def loss(params, patches):
          logits = model.apply({"params": params}, tokens.replace(patches=patches),
                               train=True, rngs={"dropout": jax.random.PRNGKey(0)})
          return jnp.sum(logits ** 2), logits

        out[remat] = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, patches)
      return out

    return tokens, step(params, tokens.patches)

  def test_gradients_are_finite_and_padding_gets_none(self, gradients):
    tokens, out = gradients
    (g_params, g_patches), _ = out["none"]
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(g_params))
    pad = np.asarray(tokens.clip == 0)
    assert pad.any()
    assert np.abs(np.asarray(g_patches)[pad]).max() == 0
    assert np.abs(np.asarray(g_patches)[~pad]).max() > 0

  @pytest.mark.parametrize("remat", ["full", "dots"])
  def test_remat_gives_the_logits_and_gradients_of_none(self, gradients, remat):
    _, out = gradients
    (g_none, l_none), (g_remat, l_remat) = out["none"], out[remat]
    np.testing.assert_allclose(l_remat, l_none, atol=1e-5, rtol=0)
    for x, y in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_none)):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)

  def test_drop_path_is_drawn_per_clip_not_per_slot_or_row(self, params):
    """Same rng, same clips, one group: the stream (clips sharing a row of slots) and the
    padded layout (a row per clip) drop the same branches only if the draw is per clip."""
    model = vit.build(SPEC, drop_path=0.5)
    frames, mask = clips(batch=4), rlt_mask(clips(batch=4))
    normalised = rlt.normalize(jnp.asarray(frames))
    counts = np.asarray(mask.sum(-1))

    @jax.jit
    def train_logits(params, frames, mask, rng):
      out = {}
      for kind in layout.KINDS:
        plan = layout.plan(counts, layout.Layout(kind, capacity_step=8), num_tokens=N,
                           groups=1)
        tokens = layout.tokenize(frames, mask, plan, tubelet_size=TS, patch_size=P)
        out[kind] = model.apply({"params": params}, tokens, train=True, rngs={"dropout": rng})
      return out

    out = train_logits(params, normalised, mask, jax.random.PRNGKey(5))
    np.testing.assert_allclose(out["stream"], out["padded"], atol=1e-5, rtol=0)
    evaluation = batch_logits(vit.build(SPEC), params, frames, mask)  # no drop path
    assert np.abs(np.asarray(out["stream"]) - evaluation).max() > 1e-3  # drop path did act

  def test_bfloat16_compute_keeps_fp32_params_and_is_close(self, params):
    frames, mask = clips(batch=4), rlt_mask(clips(batch=4))
    fp32 = batch_logits(vit.build(SPEC), params, frames, mask)
    bf16_model = vit.build(SPEC, dtype="bfloat16")
    out = batch_logits(bf16_model, params, frames, mask)
    assert out.dtype == np.float32
    fresh = jax.eval_shape(bf16_model.init, jax.random.PRNGKey(0),
                           full_tokens(jnp.zeros((1, 8, 64, 64, 3))))["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype("float32")}
    assert 0 < np.abs(out - fp32).max() < 0.1

  def test_numpy_params_work_inside_jit(self):
    """`checkpoint.load_model` returns NumPy params; a jitted function that closes over them
    (rather than taking them as arguments) must run too, length embedding included."""
    spec = dataclasses.replace(SPEC, length_embedding=True)
    params = jax.tree_util.tree_map(np.asarray, random_params(spec))
    tokens = full_tokens(rlt.normalize(jnp.asarray(clips(batch=2))), spec)
    model = vit.build(spec)
    got = jax.jit(lambda t: model.apply({"params": params}, t))(tokens)
    np.testing.assert_allclose(got, model.apply({"params": params}, tokens), atol=1e-5)


class TestScan:
  """model.scan: one scanned block over stacked parameters computes what the unrolled blocks
  compute; saved models keep one `blocks_i` per block."""

  def test_blocks_stack_under_one_name_and_unstack_exactly(self, params):
    stacked = vit.arrange_blocks(params, scan=True)
    assert "blocks" in stacked and not any(k.startswith("blocks_") for k in stacked)
    assert stacked["blocks"]["mlp"]["fc1"]["kernel"].shape == (
        SPEC.depth, SPEC.width, SPEC.mlp_dim)
    fresh = jax.eval_shape(vit.build(SPEC, scan=True).init, jax.random.PRNGKey(0),
                           full_tokens(jnp.zeros((1, 8, 64, 64, 3))))["params"]
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(stacked)
    back = vit.arrange_blocks(stacked, scan=False)
    assert vit.arrange_blocks(back, scan=False).keys() == params.keys()
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)

  @pytest.mark.parametrize("remat", ["none", "full"])
  def test_scanned_blocks_give_the_logits_and_gradients_of_unrolled_ones(self, remat):
    spec, unrolled, tokens = stream_with_length_embedding()

    def grads(model, p):
      loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, train=True,
                                           rngs={"dropout": jax.random.PRNGKey(0)}) ** 2)
      return jax.value_and_grad(loss)(p)

    (want, g_want) = grads(vit.build(spec), unrolled)
    (got, g_got) = grads(vit.build(spec, scan=True, remat=remat),
                         vit.arrange_blocks(unrolled, scan=True))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           vit.arrange_blocks(g_got, scan=False), g_want)

  def test_drop_path_acts_in_scanned_blocks(self, params):
    frames, mask = clips(batch=4), rlt_mask(clips(batch=4))
    stacked = vit.arrange_blocks(params, scan=True)
    plan = layout.plan(np.asarray(mask.sum(-1)), layout.Layout("stream", capacity_step=8),
                       num_tokens=N, groups=1)
    tokens = layout.tokenize(rlt.normalize(jnp.asarray(frames)), mask, plan, tubelet_size=TS,
                             patch_size=P)
    train = vit.build(SPEC, scan=True, drop_path=0.9).apply(
        {"params": stacked}, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    evaluation = batch_logits(vit.build(SPEC, scan=True), stacked, frames, mask)
    np.testing.assert_allclose(evaluation, batch_logits(vit.build(SPEC), params, frames, mask),
                               atol=1e-6)
    assert np.abs(np.asarray(train) - evaluation).max() > 1e-3

  def test_scan_and_token_merging_together_are_refused(self):
    with pytest.raises(ValueError, match="model.scan=True with ToMe"):
      jax.eval_shape(vit.build(SPEC, scan=True, tome=(4, 0)).init, jax.random.PRNGKey(0),
                     full_tokens(jnp.zeros((1, 8, 64, 64, 3))))

  def test_a_scanned_model_is_saved_with_one_entry_per_block(self, params, tmp_path):
    checkpoint.save_model(tmp_path / "model", vit.arrange_blocks(params, scan=True), SPEC)
    spec, loaded = checkpoint.load_model(tmp_path / "model")
    assert spec == SPEC and f"blocks_{SPEC.depth - 1}" in loaded and "blocks" not in loaded
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


class TestTokenMerging:

  def test_an_all_zero_schedule_is_bitwise_the_plain_model(self, params):
    frames, mask = clips(batch=4), rlt_mask(clips(batch=4))
    tokens = full_tokens(jnp.zeros((1, 8, 64, 64, 3)))
    init = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), tokens)
    assert (jax.tree_util.tree_structure(init(vit.build(SPEC, tome=(0, 0))))
            == jax.tree_util.tree_structure(init(vit.build(SPEC))))
    for kind in layout.KINDS:
      np.testing.assert_array_equal(
          batch_logits(vit.build(SPEC, tome=(0, 0)), params, frames, mask, kind),
          batch_logits(vit.build(SPEC), params, frames, mask, kind))

  @pytest.fixture(scope="class")
  def merged_alone(self, params):
    """Four clips of 27 kept tokens each, a different random subset per clip (equal counts so
    that the references share one compilation: ToMe compiles slowly), each merged on its own;
    and the logits without ToMe. Block 0 merges 8 tokens; block 1 attends to the merged tokens
    by size and pooling weighs them by size."""
    model = vit.build(SPEC, tome=(8, 0))
    frames = clips(batch=4)
    mask = rlt.random_mask(jax.random.PRNGKey(3), 4, SPEC.grid, 27 / N).reshape(4, N)
    alone = logits_alone(model, params, rlt.normalize(jnp.asarray(frames)), mask)
    plain = batch_logits(vit.build(SPEC), params, frames, mask)
    return model, frames, mask, alone, plain

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_merging_never_crosses_clips(self, params, merged_alone, kind):
    """Rows hold padding in both layouts (C = 32 slots for 27 tokens)."""
    model, frames, mask, alone, plain = merged_alone
    assert np.asarray(mask.sum(-1)).tolist() == [27] * 4
    assert tome.schedule(model.tome, SPEC.depth, 27) == model.tome  # a valid schedule
    assert np.abs(alone - plain).max() > 1e-3  # ToMe did merge
    np.testing.assert_allclose(batch_logits(model, params, frames, mask, kind), alone, atol=1e-5,
                               rtol=0)

  def test_proportional_attention_through_a_fused_kernel_gives_the_same_logits(
      self, params, merged_alone):
    """Splash (Pallas interpret mode here; cuDNN on a GPU) takes the size bias as head dims."""
    model, frames, mask, _, _ = merged_alone
    fused = model.clone(attention="splash")
    np.testing.assert_allclose(batch_logits(fused, params, frames, mask, "padded"),
                               batch_logits(model, params, frames, mask, "padded"), atol=1e-5,
                               rtol=0)
