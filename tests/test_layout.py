"""layout.py: how kept tokens are laid out in static shapes.

The central invariant: whatever the layout ('stream' or 'padded'), the number of groups and
the micro-batch split, each clip's logits equal those of the model run on that clip's kept
tokens alone (a one-clip batch with no padding at all). Padding is never attended to and never
pooled. The host `plan` gives static sizes that hold every kept token and come from a bounded
set, so a run compiles a bounded number of shapes.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax import layout, rlt
from rlt_jax.models import vit

# 8 frames of 64 × 64: a grid of 4 × 4 × 4 = 64 tokens.
SPEC = vit.ModelSpec.from_variant("tiny", num_classes=5, num_frames=8, image_size=64)
N = SPEC.num_tokens
TS, P = SPEC.tubelet_size, SPEC.patch_size


def clips(batch=8, seed=0):
  """uint8 clips: a static texture with a moving white square whose size differs per clip, so
  RLT keeps a different number of tokens in each (21 … 54 of 64 at seed 0)."""
  rng = np.random.RandomState(seed)
  frames = np.repeat(rng.randint(0, 256, (batch, 1, 64, 64, 3)), 8, axis=1)
  for b in range(batch):
    s = 6 + 5 * (b % 8)
    for i in range(8):
      frames[b, i, 3 * i:3 * i + s, 4 * i:4 * i + s] = 255
  return frames.astype(np.uint8)


def random_params(spec=SPEC, seed=0):
  """Every parameter random and O(1)-ish (not the tiny default init), so that any token that
  leaks into or out of a clip shows up in its logits."""
  tokens = full_tokens(jnp.zeros((1, spec.num_frames, spec.image_size, spec.image_size, 3)),
                       spec)
  params = jax.eval_shape(vit.build(spec).init, jax.random.PRNGKey(0), tokens)["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.RandomState(seed)
  new = [jnp.asarray(rng.normal(scale=np.prod(x.shape[:-1]) ** -0.5 if x.ndim > 1 else 0.3,
                                size=x.shape), jnp.float32) for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, new)


def full_tokens(frames, spec=SPEC):
  """All tokens of every clip, one row per clip, no padding."""
  batch = frames.shape[0]
  plan = layout.plan(np.full(batch, spec.num_tokens), layout.Layout("padded"),
                     num_tokens=spec.num_tokens, groups=1)
  return layout.tokenize(frames, jnp.ones((batch, spec.num_tokens), bool), plan,
                         tubelet_size=spec.tubelet_size, patch_size=spec.patch_size)


def plan_alone(mask, spec=SPEC):
  """The plan of one clip's kept tokens with no padding at all: the reference layout."""
  k = int(np.asarray(mask).sum())
  plan = layout.plan(np.array([k]), layout.Layout("padded", capacity=k),
                     num_tokens=spec.num_tokens, groups=1)
  assert plan.length == plan.capacity == k
  return plan


@functools.partial(jax.jit, static_argnums=(0, 4))
def run(model, params, frames, mask, plan):
  """Tokenise normalised frames under `plan` and run the model: logits (B, classes)."""
  tokens = layout.tokenize(frames, mask, plan, tubelet_size=model.spec.tubelet_size,
                           patch_size=model.spec.patch_size)
  return model.apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=2)
def tokenize(frames, mask, plan):
  """`layout.tokenize` of the test clips, compiled once per plan."""
  return layout.tokenize(frames, mask, plan, tubelet_size=TS, patch_size=P)


def logits_alone(model, params, frames, mask):
  """(B, classes): each clip's logits from a batch of that clip alone."""
  return np.stack([np.asarray(run(model, params, frames[b:b + 1], mask[b:b + 1],
                                  plan_alone(mask[b], model.spec)))[0]
                   for b in range(len(frames))])


@pytest.fixture(scope="module")
def batch():
  """8 normalised clips, their RLT masks (B, N), and each clip's logits alone."""
  spec = dataclasses.replace(SPEC, length_embedding=True)
  model = vit.build(spec)
  params = random_params(spec)
  frames = rlt.normalize(jnp.asarray(clips()))
  mask = rlt.select(frames, rlt.Policy("rlt"), tubelet_size=TS, patch_size=P)
  counts = np.asarray(mask.sum(-1))
  assert len(set(counts.tolist())) == 8 and counts.max() < N  # RLT really drops tokens
  return dict(model=model, params=params, frames=frames, mask=mask, counts=counts,
              alone=logits_alone(model, params, frames, mask))


def plan_of(batch, kind, groups=2):
  """The plan of the batch's exact counts (rows in multiples of 8, 2 groups)."""
  return layout.plan(batch["counts"], layout.Layout(kind, capacity_step=8), num_tokens=N,
                     groups=groups)


def padding_slots(tokens):
  return np.asarray(tokens.clip) == 0


class TestEachClipEqualsItsTokensAlone:

  @pytest.mark.parametrize("kind", layout.KINDS)
  @pytest.mark.parametrize("groups,micro_batches", [(1, 1), (2, 1), (2, 2)])
  def test_logits_equal_the_clip_alone(self, batch, kind, groups, micro_batches):
    """Run lengths enter the logits too (the model has a length embedding)."""
    token_layout = layout.Layout(kind, capacity_step=8)
    plan = layout.plan(batch["counts"], token_layout, num_tokens=N, groups=groups,
                       micro_batches=micro_batches)
    assert plan.groups == groups and plan.clips == 8 // (groups * micro_batches)
    for j in range(micro_batches):  # the train step's split: rows j, j + k, …
      rows = np.arange(j, 8, micro_batches)
      got = run(batch["model"], batch["params"], batch["frames"][rows], batch["mask"][rows],
                plan)
      np.testing.assert_allclose(got, batch["alone"][rows], atol=1e-5, rtol=0)

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_the_shapes_really_hold_padding(self, batch, kind):
    """(So that the test above is about padding.) Every plan runs more slots than kept
    tokens, and fewer than all tokens."""
    for groups, micro_batches in [(1, 1), (2, 1), (2, 2)]:
      plan = layout.plan(batch["counts"], layout.Layout(kind, capacity_step=8), num_tokens=N,
                         groups=groups, micro_batches=micro_batches)
      for j in range(micro_batches):
        kept = batch["counts"][j::micro_batches].sum()
        assert kept < plan.slots < len(batch["counts"][j::micro_batches]) * N


class TestPaddingIsNeverAttendedOrPooled:

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_pixels_of_dropped_tokens_change_nothing(self, batch, kind):
    frames, mask = batch["frames"], batch["mask"]
    dropped = ~np.asarray(mask).reshape(8, 4, 1, 4, 1, 4, 1, 1)
    dropped = np.broadcast_to(dropped, (8, 4, TS, 4, P, 4, P, 1)).reshape(8, 8, 64, 64, 1)
    noise = np.random.RandomState(1).normal(scale=10.0, size=frames.shape).astype(np.float32)
    changed = jnp.where(dropped, noise, frames)
    assert not np.array_equal(changed, frames)
    plan = plan_of(batch, kind)
    np.testing.assert_array_equal(run(batch["model"], batch["params"], changed, mask, plan),
                                  run(batch["model"], batch["params"], frames, mask, plan))

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_garbage_in_padding_slots_changes_nothing(self, batch, kind):
    plan = plan_of(batch, kind)
    tokens = tokenize(batch["frames"], batch["mask"], plan)
    pad = jnp.asarray(padding_slots(tokens))
    noise = jax.random.normal(jax.random.PRNGKey(0), tokens.patches.shape) * 10
    garbage = tokens.replace(patches=jnp.where(pad[..., None], noise, tokens.patches),
                             positions=jnp.where(pad, 17, tokens.positions),
                             lengths=jnp.where(pad, 3, tokens.lengths))
    apply = jax.jit(lambda t: batch["model"].apply({"params": batch["params"]}, t))
    np.testing.assert_allclose(apply(garbage), apply(tokens), atol=1e-6, rtol=0)

  def test_a_padding_clip_keeps_no_token_and_changes_no_other_clip(self, batch):
    model, params = batch["model"], batch["params"]
    valid = np.ones(8, bool)
    valid[[2, 5]] = False
    frames = np.asarray(batch["frames"]).copy()
    frames[2] = np.random.RandomState(0).normal(size=frames[2].shape)  # whatever it holds
    mask = rlt.select(jnp.asarray(frames), rlt.Policy("rlt"), tubelet_size=TS, patch_size=P,
                      valid=jnp.asarray(valid))
    counts = np.asarray(mask.sum(-1))
    assert counts[2] == counts[5] == 0
    np.testing.assert_array_equal(counts[valid], batch["counts"][valid])
    for kind in layout.KINDS:
      plan = layout.plan(counts, layout.Layout(kind, capacity_step=8), num_tokens=N, groups=2)
      got = np.asarray(run(model, params, jnp.asarray(frames), mask, plan))
      assert np.isfinite(got).all()
      np.testing.assert_allclose(got[valid], batch["alone"][valid], atol=1e-5, rtol=0)

  def test_pool_is_the_mean_of_each_clips_own_slots(self, batch):
    counts = batch["counts"].copy()
    mask = np.asarray(batch["mask"]).copy()
    mask[3] = False  # an empty clip pools to zeros
    counts[3] = 0
    for kind in layout.KINDS:
      plan = layout.plan(counts, layout.Layout(kind, capacity_step=8), num_tokens=N, groups=2)
      tokens = tokenize(batch["frames"], jnp.asarray(mask), plan)
      x = jax.random.normal(jax.random.PRNGKey(1), (*tokens.clip.shape, 3))
      x = jnp.where(jnp.asarray(padding_slots(tokens))[..., None], 1e6, x)  # padding: huge
      pooled = np.asarray(layout.pool(x, tokens))
      clip, x = np.asarray(tokens.clip), np.asarray(x)
      for b in range(8):
        g, j = divmod(b, plan.clips)
        want = x[g][clip[g] == j + 1].mean(0) if counts[b] else np.zeros(3)
        np.testing.assert_allclose(pooled[b], want, atol=1e-6)


def random_counts(rng, batch, num_tokens):
  counts = rng.randint(0, num_tokens + 1, batch)
  counts[rng.rand(batch) < 0.2] = num_tokens  # some full clips
  return counts


class TestPlan:

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_invariants_on_random_batches(self, kind):
    rng = np.random.RandomState(0)
    for _ in range(300):
      num_tokens = int(rng.choice([64, 200, 1568]))
      step = int(rng.choice([1, 8, 128]))
      buckets = int(rng.choice([1, 4, 16]))
      groups, micro, clips_per_group = (int(rng.randint(1, 5)), int(rng.randint(1, 4)),
                                        int(rng.randint(1, 5)))
      counts = random_counts(rng, groups * micro * clips_per_group, num_tokens)
      plan = layout.plan(counts, layout.Layout(kind, capacity_step=step, stream_buckets=buckets),
                         num_tokens=num_tokens, groups=groups, micro_batches=micro)
      b = plan.clips
      assert (plan.kind, plan.groups, b, plan.num_tokens) == (kind, groups, clips_per_group,
                                                              num_tokens)
      # capacity: holds the largest clip, a multiple of the step (or N), never more than N
      assert counts.max() <= plan.capacity <= num_tokens
      assert plan.capacity % step == 0 or plan.capacity == num_tokens
      # length: holds every group of every micro-batch (rows j, j + k, … form micro-batch j)
      for j in range(micro):
        for group in counts[j::micro].reshape(groups, b):
          assert group.sum() <= plan.length
      if kind == "padded":
        assert plan.length == b * plan.capacity
      else:
        bucket = math.ceil(b * num_tokens / buckets)
        assert plan.length % bucket == 0 or plan.length == b * num_tokens
        assert plan.length <= b * num_tokens
      assert plan.slots == groups * plan.length

  def test_micro_batches_are_rows_j_j_plus_k(self):
    """Rows 0, 2 keep everything and rows 1, 3 nothing: micro-batch 0 of 2 is full, so the
    stream must hold 2·N (split contiguously, each micro-batch would need only N)."""
    counts = np.array([64, 0, 64, 0])
    plan = layout.plan(counts, layout.Layout("stream", stream_buckets=16), num_tokens=64,
                       groups=1, micro_batches=2)
    assert plan.clips == 2 and plan.length == 128
    plan = layout.plan(np.array([64, 64, 0, 0]), layout.Layout("stream", stream_buckets=16),
                       num_tokens=64, groups=1, micro_batches=2)
    assert plan.length == 64

  def test_the_number_of_shapes_is_bounded(self):
    """Whatever the counts, C takes at most ⌈N / capacity_step⌉ values and the stream length at
    most `stream_buckets`: a run compiles a bounded number of shapes."""
    stream = layout.Layout("stream", capacity_step=128, stream_buckets=16)
    plans = [layout.plan(np.array([k, n - k]), stream, num_tokens=1568, groups=1)
             for n in range(0, 2 * 1568 + 1, 7) for k in (max(0, n - 1568), n // 2)]
    assert len({p.capacity for p in plans}) == math.ceil(1568 / 128)
    assert len({p.length for p in plans}) == 16

  def test_padded_capacity_is_the_smallest_step_multiple_that_fits(self):
    padded = layout.Layout("padded", capacity_step=128)
    plan = lambda counts: layout.plan(np.array(counts), padded, num_tokens=1568, groups=1)
    assert plan([100, 700, 640]).capacity == 768
    assert plan([1568, 3]).capacity == 1568
    assert plan([1537]).capacity == 1568  # not 1664: N is the last bucket
    assert plan([0, 0]).capacity == 128

  def test_a_fixed_capacity_is_used_as_is_and_overflow_raises(self):
    fixed = layout.Layout("padded", capacity=48)
    assert layout.plan(np.array([10, 48]), fixed, num_tokens=64, groups=1).capacity == 48
    with pytest.raises(OverflowError, match=r"keeps 49 tokens.*layout.capacity=48"):
      layout.plan(np.array([10, 49]), fixed, num_tokens=64, groups=1)
    with pytest.raises(OverflowError, match="layout.capacity=48"):
      layout.plan(np.array([10, 49]), layout.Layout("stream", capacity=48), num_tokens=64,
                  groups=1)

  def test_a_batch_that_does_not_split_is_an_error(self):
    with pytest.raises(ValueError, match="6 clips does not split into 4 groups"):
      layout.plan(np.ones(6), layout.Layout(), num_tokens=64, groups=4)
    with pytest.raises(ValueError, match="2 groups × 2 micro-batches"):
      layout.plan(np.ones(6), layout.Layout(), num_tokens=64, groups=2, micro_batches=2)

  @pytest.mark.parametrize("field,value,match", [
      ("kind", "packed", "layout.kind='packed'"),
      ("capacity_step", 0, "layout.capacity_step=0"),
      ("stream_buckets", 2.5, "layout.stream_buckets=2.5"),
      ("capacity", 0, "layout.capacity=0"),
  ])
  def test_bad_settings_name_the_field(self, field, value, match):
    with pytest.raises(ValueError, match=match):
      layout.Layout(**{field: value})


class TestTokenize:

  def explicit_patch(self, frames, b, n):
    """Token n of clip b cut out by hand: (t, y, x) order, Conv3d kernel order (t, y, x, c)."""
    t, rest = divmod(n, 16)
    y, x = divmod(rest, 4)
    return frames[b, t * TS:(t + 1) * TS, y * P:(y + 1) * P, x * P:(x + 1) * P].reshape(-1)

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_each_clip_keeps_its_tokens_in_order_with_positions_lengths_and_ids(self, batch,
                                                                              kind):
    frames, mask, counts = np.asarray(batch["frames"]), np.asarray(batch["mask"]), batch["counts"]
    plan = layout.plan(counts, layout.Layout(kind, capacity_step=8), num_tokens=N, groups=2)
    tokens = jax.tree_util.tree_map(
        np.asarray, tokenize(jnp.asarray(frames), jnp.asarray(mask), plan))
    run_lengths = np.asarray(rlt.run_lengths(mask.reshape(8, 4, 4, 4))).reshape(8, N)
    np.testing.assert_array_equal(tokens.kept, counts)
    b = plan.clips
    for clip in range(8):
      g, j = divmod(clip, b)
      kept = np.nonzero(mask[clip])[0]
      slots = np.nonzero(tokens.clip[g] == j + 1)[0]
      if kind == "stream":  # contiguous, clip after clip
        start = counts[g * b:clip].sum()
      else:  # row j of C slots, valid tokens first
        start = j * plan.capacity
      np.testing.assert_array_equal(slots, start + np.arange(len(kept)))
      np.testing.assert_array_equal(tokens.positions[g, slots], kept)
      np.testing.assert_array_equal(tokens.lengths[g, slots], run_lengths[clip, kept])
      for slot, n in zip(slots, kept):
        np.testing.assert_array_equal(tokens.patches[g, slot],
                                      self.explicit_patch(frames, clip, n))
    pad = padding_slots(tokens)
    assert pad.sum() == plan.slots - counts.sum()
    assert not tokens.patches[pad].any() and not tokens.lengths[pad].any()
    assert not tokens.positions[pad].any()

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_to_rows_and_from_rows_round_trip(self, batch, kind):
    plan = plan_of(batch, kind)
    tokens = tokenize(batch["frames"], batch["mask"], plan)
    x = np.random.RandomState(0).normal(size=(2, plan.length, 2, 3)).astype(np.float32)
    rows = np.asarray(layout.to_rows(jnp.asarray(x), tokens))
    assert rows.shape == (8, plan.capacity, 2, 3)
    clip = np.asarray(tokens.clip)
    for b in range(8):  # row b: clip b's slots in order, then padding
      g, j = divmod(b, plan.clips)
      k = batch["counts"][b]
      np.testing.assert_array_equal(rows[b, :k], x[g][clip[g] == j + 1])
    back = np.asarray(layout.from_rows(jnp.asarray(rows), tokens))
    real = clip > 0
    np.testing.assert_array_equal(back[real], x[real])
    again = np.asarray(layout.to_rows(jnp.asarray(back), tokens))
    for b in range(8):
      k = batch["counts"][b]
      np.testing.assert_array_equal(again[b, :k], rows[b, :k])

  def test_gradients_of_to_rows_and_from_rows_are_those_of_plain_indexing(self, batch):
    """The backward of each is the other's gather (no scatter-add); it must equal the exact
    transpose of indexing with a zero padding slot, whatever the cotangent holds."""
    plan = plan_of(batch, "stream")
    tokens = tokenize(batch["frames"], batch["mask"], plan)
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.normal(size=(2, plan.length, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, plan.length, 3)), jnp.float32)

    def plain_to_rows(x):
      x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
      return jax.vmap(lambda xg, i: xg[i])(x, tokens.rows).reshape(8, plan.capacity, 3)

    def plain_from_rows(y):
      y = jnp.concatenate([y.reshape(2, -1, 3), jnp.zeros_like(y.reshape(2, -1, 3)[:, :1])], 1)
      return jax.vmap(lambda yg, i: yg[i])(y, tokens.slots)

    ours = lambda x: layout.from_rows(jnp.sin(layout.to_rows(x, tokens)) ** 2, tokens)
    plain = lambda x: plain_from_rows(jnp.sin(plain_to_rows(x)) ** 2)
    np.testing.assert_array_equal(ours(x), plain(x))
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
    np.testing.assert_array_equal(grad(ours), grad(plain))

  def test_the_train_step_of_the_stream_has_no_scatter(self, batch):
    """Scatter-adds (the transposes of gathers) serialise on a GPU when many padding entries
    add into one slot: the gradient of the stream layout must be gathers only."""
    plan = plan_of(batch, "stream")
    model = vit.build(dataclasses.replace(SPEC, length_embedding=True), drop_path=0.1)
    params = model.init(jax.random.PRNGKey(0), full_tokens(batch["frames"][:1]))["params"]

    def loss(params):
      tokens = tokenize(batch["frames"], batch["mask"], plan)
      return model.apply({"params": params}, tokens, train=True,
                         rngs={"dropout": jax.random.PRNGKey(1)}).sum()

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    float_scatters = [line for line in hlo.splitlines()
                      if " scatter(" in line and "f32[" in line.split("=")[1].split(" ")[1]]
    assert not float_scatters

  def test_a_mask_that_does_not_fit_the_plan_is_an_error(self, batch):
    plan = layout.plan(batch["counts"], layout.Layout(), num_tokens=N, groups=2)
    with pytest.raises(ValueError, match="does not fit"):
      layout.tokenize(batch["frames"][:4], batch["mask"][:4], plan, tubelet_size=TS,
                      patch_size=P)


class TestShapeSet:
  """A run's shapes are fixed up front (at most `max_shapes`) and every batch fits one."""

  def shapes(self, samples, kind="stream", max_shapes=4, groups=2, micro=1):
    return layout.choose_shapes(samples, layout.Layout(kind, capacity_step=8, stream_buckets=8),
                                num_tokens=N, groups=groups, micro_batches=micro,
                                max_shapes=max_shapes, width=64, mlp_dim=256)

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_any_batch_fits_and_nothing_is_cut(self, kind):
    rng = np.random.RandomState(0)
    samples = [rng.randint(10, 40, 8) for _ in range(6)]
    shapes = self.shapes(samples, kind)
    assert 1 <= len(shapes.plans) <= 4
    full = shapes.plans[-1]
    assert full.capacity == N and full.length == full.clips * N  # holds anything
    for _ in range(200):  # counts never seen, up to every token
      counts = random_counts(rng, 8, N)
      chosen = shapes.fit(counts)
      assert chosen in shapes.plans
      exact = layout.plan(counts, layout.Layout(kind, capacity_step=8, stream_buckets=8),
                          num_tokens=N, groups=2)
      assert chosen.capacity >= counts.max() and chosen.length >= exact.length or (
          kind == "padded" and chosen.capacity >= exact.capacity)

  def test_each_batch_takes_the_cheapest_shape_that_holds_it(self):
    rng = np.random.RandomState(1)
    samples = [rng.randint(5, 60, 8) for _ in range(12)]
    shapes = self.shapes(samples, max_shapes=5)
    cost = lambda p: layout.plan_flops(p, 64, 256)
    assert [cost(p) for p in shapes.plans] == sorted(cost(p) for p in shapes.plans)
    for counts in samples:
      chosen = shapes.fit(counts)
      _, slots, most = layout.needs(counts, groups=2)
      holding = [p for p in shapes.plans if p.capacity >= most and p.length >= slots]
      assert chosen == min(holding, key=cost)

  def test_more_shapes_never_cost_more_and_the_samples_bound_how_many(self):
    rng = np.random.RandomState(2)
    samples = [rng.randint(5, 60, 8) for _ in range(12)]
    spent = []
    for k in (1, 2, 4, 16):
      shapes = self.shapes(samples, max_shapes=k)
      assert len(shapes.plans) <= k
      spent.append(sum(layout.plan_flops(shapes.fit(c), 64, 256) for c in samples))
    assert spent == sorted(spent, reverse=True) and spent[-1] < spent[0]
    exact = {layout.plan(c, layout.Layout("stream", capacity_step=8, stream_buckets=8),
                         num_tokens=N, groups=2) for c in samples}
    assert len(self.shapes(samples, max_shapes=64).plans) <= len(exact) + 1

  def test_micro_batches_are_planned_as_the_step_splits_them(self):
    samples = [np.array([64, 0, 64, 0])]  # micro-batch 0 (rows 0 and 2) is full
    shapes = self.shapes(samples, groups=1, micro=2)
    assert shapes.fit(samples[0]).length == 2 * N

  def test_a_json_round_trip_keeps_the_shapes(self):
    shapes = self.shapes([np.arange(8) * 7])
    assert layout.ShapeSet.from_json(shapes.to_json()) == shapes


class TestFlops:

  def test_all_tokens_is_ratio_one(self):
    counts = np.full(8, 1568)
    assert layout.ideal_flops_ratio(counts, 1568, 768, 3072) == pytest.approx(1.0)
    for kind in layout.KINDS:
      plan = layout.plan(counts, layout.Layout(kind), num_tokens=1568, groups=2)
      assert layout.plan_flops_ratio(plan, 768, 3072) == pytest.approx(1.0)

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_a_plan_never_runs_fewer_flops_than_the_kept_tokens(self, kind):
    rng = np.random.RandomState(0)
    for _ in range(100):
      counts = random_counts(rng, 8, 1568)
      ideal = layout.ideal_flops_ratio(counts, 1568, 768, 3072)
      assert 0 <= ideal <= 1
      plan = layout.plan(counts, layout.Layout(kind), num_tokens=1568, groups=2)
      assert ideal <= layout.plan_flops_ratio(plan, 768, 3072) + 1e-12

  def test_fewer_tokens_cost_less_than_proportionally(self):
    """Attention is quadratic: half the tokens cost between 1/4 and 1/2 of the FLOPs."""
    ratio = layout.ideal_flops_ratio(np.array([784]), 1568, 768, 3072)
    assert 0.25 < ratio < 0.5

  def test_one_block_formula_counts_matmuls_and_attention(self):
    """ViT-B/16 at 1568 tokens: 2·n·(4d² + 2dm) for the linear layers, 4·n²·d for attention."""
    n, d, m = 1568, 768, 3072
    assert layout.block_flops([n], d, m) == 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    assert layout.block_flops(2 * n, d, m, rows=[n, n]) == 2 * layout.block_flops([n], d, m)
