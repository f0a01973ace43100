"""models/vit.py: VideoMAE-2 math, and the central RLT invariant.

The invariant: whatever the policy and the batching (padded to a capacity, or packed with
segment ids), each clip's logits equal those of the model run on that clip's kept tokens
alone, with no padding at all.
"""

import functools
from math import erf

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax import rlt
from rlt_jax.models import vit

SMALL = dict(num_frames=8, image_size=32, patch_size=8)  # 4 × 4 × 4 = 64 tokens


def randomize(params, seed=0):
  """Every parameter random and O(1)-ish, so mistakes show up in the logits (see fixtures)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(seed)
  new = []
  for leaf in leaves:
    fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
    new.append(rng.normal(scale=fan_in ** -0.5 if leaf.ndim > 1 else 0.3,
                          size=leaf.shape).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, new)


def make(policy="none", num_classes=7, seed=0, **overrides):
  tok_fields = {k: overrides.pop(k) for k in list(overrides)
                if k in rlt.TokenizerConfig.__dataclass_fields__}
  model = vit.build("tiny", num_classes=num_classes,
                    tokenizer=rlt.TokenizerConfig(policy=policy, **tok_fields),
                    **(SMALL | overrides))
  frames = clips()
  variables = model.init({"params": jax.random.PRNGKey(0), "tokens": jax.random.PRNGKey(1)},
                         frames)
  return model, {"params": randomize(variables["params"], seed)}


def clips(batch=4, seed=0):
  """uint8 clips: a static texture with a moving square of per-clip size, plus noise."""
  rng = np.random.RandomState(seed)
  frames = np.repeat(rng.randint(0, 256, (batch, 1, 32, 32, 3)), 8, axis=1)
  for b in range(batch):
    s = 6 + 4 * b
    for i in range(8):
      frames[b, i, 2 * i:2 * i + s, 3 * i:3 * i + s] = 255
  return frames.astype(np.uint8)


def tokens_alone(model, variables, selection, b):
  """The clip's kept tokens as a one-row batch with no padding."""
  kept = np.nonzero(np.asarray(selection.mask[b]))[0]
  k = len(kept)
  batch = rlt.TokenBatch(
      patches=jnp.asarray(selection.patches[b][kept])[None],
      positions=jnp.asarray(kept, jnp.int32)[None],
      lengths=jnp.asarray(selection.lengths[b][kept])[None],
      segment_ids=jnp.ones((1, k), jnp.int32),
      kept=jnp.asarray([k], jnp.int32), placed=jnp.asarray([k], jnp.int32))
  return model.apply(variables, batch).logits[0]


def numpy_forward(params, frames, num_heads):
  """VideoMAE-2 forward in float64 numpy, written from shared/specs/videomae2.md."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), flax.core.unfreeze(params))
  x = np.asarray(rlt.normalize(frames), np.float64)
  patches = np.asarray(rlt.patchify(x, 2, 8))
  kernel = p["patch_embed"]["kernel"]
  tokens = patches @ kernel.reshape(-1, kernel.shape[-1]) + p["patch_embed"]["bias"]
  n, d = tokens.shape[1:]
  j = np.arange(d)
  angle = np.arange(n)[:, None] / 10000 ** (2 * (j // 2) / d)
  tokens = tokens + np.where(j % 2 == 0, np.sin(angle), np.cos(angle))

  def norm(v, q):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

  gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
  for i in range(2):
    blk = p[f"blocks_{i}"]
    h = norm(tokens, blk["norm1"])
    qkv = h @ blk["attn"]["qkv"]["kernel"]
    q, k, v = np.split(qkv, 3, axis=-1)
    q, v = q + blk["attn"]["q_bias"], v + blk["attn"]["v_bias"]
    split = lambda t: t.reshape(*t.shape[:2], num_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    a = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(tokens.shape)
    tokens = tokens + o @ blk["attn"]["proj"]["kernel"] + blk["attn"]["proj"]["bias"]
    h = norm(tokens, blk["norm2"])
    h = gelu(h @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"])
    tokens = tokens + h @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
  pooled = norm(tokens.mean(1), p["fc_norm"])
  return pooled @ p["head"]["kernel"] + p["head"]["bias"]


class TestArchitecture:

  @pytest.mark.parametrize("name,millions", [("S/16", 22.0), ("B/16", 86.5), ("L/16", 304.3),
                                             ("H/16", 632.1), ("g/14", 1012.2)])
  def test_variants_have_the_published_sizes(self, name, millions):
    size = 224
    model = vit.build(name, num_classes=400, image_size=size)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 16, size, size, 3), jnp.uint8))
    count = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
    assert round(count / 1e6, 1) == millions

  def test_vit_g_has_2048_tokens_and_mlp_6144(self):
    model = vit.build("g/14", num_classes=400)
    assert model.num_tokens == 2048 and model.mlp_dim == 6144

  def test_unknown_variant_lists_the_names(self):
    with pytest.raises(ValueError, match="model.variant='X/16'.*B/16"):
      vit.build("X/16", num_classes=1)

  def test_sinusoid_table_is_the_upstream_one(self, fixtures_dir):
    want = np.load(fixtures_dir / "videomae2_tiny_expected.npz")["pos_table"]
    np.testing.assert_array_equal(vit.sinusoid_table(1568, 384), want)

  def test_layer_norms_use_eps_1e6(self):
    assert vit.LAYER_NORM_EPS == 1e-6
    model, variables = make()
    bound = model.bind(variables)
    bound.setup()
    assert bound.fc_norm.epsilon == 1e-6

  def test_matches_an_independent_float64_forward(self):
    model, variables = make("none")
    frames = clips()
    got = model.apply(variables, frames).logits
    want = numpy_forward(variables["params"], frames, num_heads=2)
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_videomae2_initialisation(self):
    model = vit.build("tiny", num_classes=7, **SMALL)
    params = model.init(jax.random.PRNGKey(0), clips())["params"]
    qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert abs(qkv.std() - 0.02) < 0.003 and np.abs(qkv).max() <= 0.04 + 1e-6
    assert np.abs(params["head"]["kernel"]).max() <= 0.04 * 0.001 + 1e-9
    assert (np.asarray(params["blocks_0"]["attn"]["q_bias"]) == 0).all()
    assert (np.asarray(params["fc_norm"]["scale"]) == 1).all()
    bound = (2 * 8 * 8 * 3) ** -0.5
    assert np.abs(params["patch_embed"]["kernel"]).max() <= bound


POLICIES = [("none", {}), ("rlt", {"threshold": 0.1}), ("random", {"keep_fraction": 0.4})]


class TestKeptTokensAlone:

  @pytest.mark.parametrize("policy,kw", POLICIES)
  @pytest.mark.parametrize("layout", ["padded", "packed"])
  @pytest.mark.parametrize("length_embedding", [False, True])
  def test_each_clip_equals_its_tokens_alone(self, policy, kw, layout, length_embedding):
    frames = clips()
    model, variables = make(policy, length_embedding=length_embedding, **kw)
    config = model.tokenizer
    rngs = {"tokens": jax.random.PRNGKey(3)}
    selection = model.apply(variables, frames, rngs=rngs, method="select")
    counts = np.asarray(selection.mask.sum(-1))
    if policy == "rlt":
      assert counts.max() < 64  # RLT really drops tokens on these clips
    if layout == "padded":
      layout_config = dict(capacity=rlt.choose_capacity(counts, [16, 32, 48, 64]))
    else:
      layout_config = dict(packing=True, row_length=96,
                           num_rows=rlt.pack_rows_needed(counts, 96) + 1)  # + an empty row
    model = model.clone(tokenizer=rlt.TokenizerConfig(policy=policy, **kw, **layout_config))
    out = jax.jit(lambda v, f: model.apply(v, f, rngs=rngs))(variables, frames)
    assert int(out.num_overflow) == 0
    np.testing.assert_array_equal(out.kept, counts)
    for b in range(len(frames)):
      alone = tokens_alone(model, variables, selection, b)
      np.testing.assert_allclose(out.logits[b], alone, atol=1e-5, rtol=0)

  def test_policy_none_at_capacity_n_is_the_plain_forward(self):
    model, variables = make("none", capacity=64)
    frames = clips()
    np.testing.assert_allclose(model.apply(variables, frames).logits,
                               numpy_forward(variables["params"], frames, 2), atol=1e-5)

  @pytest.mark.parametrize("packing", [False, True])
  def test_padding_content_changes_nothing(self, packing):
    layout = dict(packing=True, row_length=128, num_rows=2) if packing else dict(capacity=64)
    model, variables = make("rlt", length_embedding=True, **layout)
    batch = rlt.compact(model.apply(variables, clips(), method="select"), model.tokenizer)
    pad = batch.segment_ids == 0
    assert bool(pad.any())
    noise = jax.random.normal(jax.random.PRNGKey(0), batch.patches.shape) * 10
    garbage = batch.replace(
        patches=jnp.where(pad[..., None], noise, batch.patches),
        positions=jnp.where(pad, 17, batch.positions),
        lengths=jnp.where(pad, 3, batch.lengths))
    np.testing.assert_allclose(model.apply(variables, garbage).logits,
                               model.apply(variables, batch).logits, atol=1e-6)


class TestOverflow:

  def test_error_policy_reports_and_raises(self):
    model, variables = make("rlt", capacity=16)
    out = model.apply(variables, clips())
    assert int(out.num_overflow) == int((np.asarray(out.kept) > 16).sum()) > 0
    with pytest.raises(OverflowError):
      rlt.raise_on_overflow(out.num_overflow, model.tokenizer)

  def test_full_policy_runs_overflowing_batches_at_full_length(self):
    model, variables = make("rlt", capacity=16, overflow="full")
    exact, _ = make("rlt")
    out = jax.jit(model.apply)(variables, clips())
    assert int(out.num_overflow) > 0
    np.testing.assert_array_equal(out.placed, out.kept)
    np.testing.assert_allclose(out.logits, exact.apply(variables, clips()).logits, atol=1e-5)

  def test_drop_least_changed_runs_capacity_tokens(self):
    model, variables = make("rlt", capacity=16, overflow="drop_least_changed")
    out = model.apply(variables, clips())
    assert int(out.placed.max()) <= 16 and int(out.num_overflow) > 0


class TestTraining:

  def test_gradients_are_finite_and_padding_gets_none(self):
    model, variables = make("rlt", capacity=64, length_embedding=True, drop_path=0.2)
    batch = rlt.compact(model.apply(variables, clips(), method="select"), model.tokenizer)

    def loss(params, patches):
      out = model.apply({"params": params}, batch.replace(patches=patches), train=True,
                        rngs={"dropout": jax.random.PRNGKey(0)})
      return jnp.sum(out.logits ** 2)

    g_params, g_patches = jax.grad(loss, argnums=(0, 1))(variables["params"], batch.patches)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(g_params))
    pad = np.asarray(batch.segment_ids == 0)
    assert np.abs(np.asarray(g_patches)[pad]).max() == 0
    assert np.abs(np.asarray(g_patches)[~pad]).max() > 0

  def test_drop_path_is_drawn_per_clip_not_per_row(self):
    # Same rng, same clips: padded (a row per clip) and packed (clips sharing rows) must
    # drop the same branches, which holds only if the draw is per clip.
    kw = dict(drop_path=0.5, dropout=0.0)
    padded, variables = make("rlt", capacity=64, **kw)
    packed = padded.clone(tokenizer=rlt.TokenizerConfig(policy="rlt", packing=True,
                                                        row_length=128, num_rows=2))
    rngs = {"dropout": jax.random.PRNGKey(5)}
    a = padded.apply(variables, clips(), train=True, rngs=rngs).logits
    b = packed.apply(variables, clips(), train=True, rngs=rngs).logits
    c = padded.apply(variables, clips(), train=False).logits
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3  # drop path did act

  def test_remat_changes_nothing(self):
    model, variables = make("rlt", capacity=64, drop_path=0.1)
    rematted = model.clone(remat=True)
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, clips(), train=True, rngs={
        "dropout": jax.random.PRNGKey(0)}).logits ** 2)
    g1 = jax.grad(loss(model))(variables["params"])
    g2 = jax.grad(loss(rematted))(variables["params"])
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
      np.testing.assert_allclose(x, y, atol=1e-5)

  def test_bfloat16_compute_keeps_fp32_params_and_is_close(self):
    model, variables = make("rlt", capacity=64)
    fp32 = model.apply(variables, clips()).logits
    bf16_model = model.clone(dtype=jnp.bfloat16)
    out = bf16_model.apply(variables, clips()).logits
    assert out.dtype == jnp.float32
    fresh = bf16_model.init(jax.random.PRNGKey(0), clips())["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype("float32")}
    assert np.abs(np.asarray(out) - np.asarray(fp32)).max() < 0.1


class TestCompilation:

  def test_one_compilation_per_capacity_bucket(self):
    model, variables = make("rlt")
    traces = []

    @functools.partial(jax.jit, static_argnums=2)
    def bucketed(variables, frames, capacity):
      traces.append(capacity)
      m = model.clone(tokenizer=rlt.TokenizerConfig(policy="rlt", capacity=capacity))
      return m.apply(variables, frames).logits

    buckets = [16, 32, 48, 64]
    used = []
    for seed in range(6):
      frames = clips(seed=seed)
      counts = rlt.keep_mask(rlt.normalize(frames), patch_size=8).reshape(4, -1).sum(-1)
      # Different batches, few shapes: vary which clips are in the batch.
      frames, counts = frames[: 2 + seed % 3], counts[: 2 + seed % 3]
      capacity = rlt.choose_capacity(counts, buckets)
      used.append((len(frames), capacity))
      bucketed(variables, frames, capacity)
    assert len(traces) == len(set(used)) < len(used)


class TestSharding:

  def test_data_sharded_forward_equals_one_device(self):
    assert jax.device_count() == 8
    model, variables = make("rlt", capacity=64)
    frames = np.concatenate([clips(seed=0), clips(seed=1)])  # 8 clips, one per device
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.jit(model.apply, in_shardings=(replicated, data))(variables, frames)
    one = jax.devices()[0]
    single = jax.jit(model.apply)(jax.device_put(variables, one), jax.device_put(frames, one))
    assert len(sharded.logits.sharding.device_set) == 8
    assert single.logits.sharding.device_set == {one}
    np.testing.assert_allclose(sharded.logits, single.logits, atol=1e-5)
    np.testing.assert_array_equal(sharded.kept, single.kept)
