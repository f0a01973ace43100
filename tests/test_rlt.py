"""rlt.py: the keep rule, run lengths, policies, and static-shape compaction."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rlt_jax import rlt


def reference_keep_mask(frames, tau, ts, p):
  """The rule of shared/specs/rlt.md, written as plainly as possible (float64 loops)."""
  b, t, hh, ww, _ = frames.shape
  x = frames.astype(np.float64)
  mask = np.zeros((b, t // ts, hh // p, ww // p), bool)
  mask[:, 0] = True
  for j in range(1, t // ts):
    for y in range(hh // p):
      for xx in range(ww // p):
        a = x[:, (j + 1) * ts - 1, y * p:(y + 1) * p, xx * p:(xx + 1) * p]
        c = x[:, (j - 1) * ts, y * p:(y + 1) * p, xx * p:(xx + 1) * p]
        mask[:, j, y, xx] = np.abs(a - c).mean(axis=(1, 2, 3)) > tau
  return mask


def static_clip(t=16, size=32, seed=0):
  frame = np.random.RandomState(seed).normal(size=(1, 1, size, size, 3)).astype(np.float32)
  return np.repeat(frame, t, axis=1)


class TestKeepMask:

  @pytest.mark.parametrize("ts,p", [(2, 16), (2, 8), (4, 8), (1, 16)])
  def test_matches_the_plain_rule_on_random_clips(self, ts, p):
    rng = np.random.RandomState(ts * 100 + p)
    base = rng.normal(size=(3, 1, 32, 32, 3))
    # Mixed motion: per-frame noise of varying strength, so scores straddle τ.
    frames = (base + rng.uniform(0, 0.3, size=(3, 16, 1, 1, 1)) *
              rng.normal(size=(3, 16, 32, 32, 3))).astype(np.float32)
    want = reference_keep_mask(frames, 0.1, ts, p)
    assert 0 < want.mean() < 1
    got_np = rlt.keep_mask(frames, threshold=0.1, tubelet_size=ts, patch_size=p)
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_array_equal(got_np, want)
    jitted = jax.jit(lambda f: rlt.keep_mask(f, threshold=0.1, tubelet_size=ts, patch_size=p))
    np.testing.assert_array_equal(np.asarray(jitted(frames)), want)

  def test_reproduces_the_release_mask_on_real_clips(self, fixtures_dir):
    data = np.load(fixtures_dir / "videomae2_tiny_expected.npz")
    frames = rlt.normalize(data["frames"])
    got = rlt.keep_mask(frames, threshold=0.1)
    np.testing.assert_array_equal(got.reshape(2, -1), data["mask"])
    np.testing.assert_array_equal(np.asarray(rlt.keep_mask(jnp.asarray(frames))).reshape(2, -1),
                                  data["mask"])
    assert got.reshape(2, -1).sum(-1).tolist() == [856, 642]

  def test_a_static_clip_keeps_only_the_first_tubelet(self):
    mask = rlt.keep_mask(static_clip())
    assert mask[:, 0].all() and not mask[:, 1:].any()

  def test_changing_one_patch_in_frame_5_keeps_exactly_token_2_y_x(self):
    frames = static_clip()
    frames[0, 5, 16:32, 0:16] += 1.0  # patch (y=1, x=0)
    mask = rlt.keep_mask(frames)
    expected = np.zeros_like(mask)
    expected[:, 0] = True
    expected[0, 2, 1, 0] = True
    np.testing.assert_array_equal(mask, expected)

  def test_frame_1_never_matters(self):
    frames = static_clip()
    frames[0, 1] += 5.0
    assert not rlt.keep_mask(frames)[:, 1:].any()

  def test_the_comparison_is_strict(self):
    frames = static_clip()
    frames[0, 3] += 0.25  # exactly representable: score of tubelet 1 is exactly 0.25
    assert not rlt.keep_mask(frames, threshold=0.25)[:, 1].any()
    assert rlt.keep_mask(frames, threshold=0.2499)[:, 1].all()

  def test_normalize_uses_imagenet_statistics(self):
    frames = np.full((1, 2, 16, 16, 3), 255, np.uint8)
    want = (1.0 - np.array(rlt.IMAGENET_MEAN)) / np.array(rlt.IMAGENET_STD)
    np.testing.assert_allclose(rlt.normalize(frames)[0, 0, 0, 0], want, rtol=1e-6)

  def test_bad_shapes_name_the_sizes(self):
    with pytest.raises(ValueError, match="multiple of tubelet_size=2"):
      rlt.keep_mask(np.zeros((1, 3, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="patch_size=16"):
      rlt.keep_mask(np.zeros((1, 4, 30, 32, 3), np.float32))


class TestRunLengths:

  def test_hand_worked_column(self):
    mask = np.zeros((1, 8, 1, 2), bool)
    mask[0, [0, 3, 5], 0, 0] = True
    mask[0, :, 0, 1] = True
    lengths = rlt.run_lengths(mask)
    assert lengths[0, :, 0, 0].tolist() == [3, 0, 0, 2, 0, 3, 0, 0]
    assert lengths[0, :, 0, 1].tolist() == [1] * 8

  def test_lengths_sum_to_n_and_numpy_equals_jax(self):
    rng = np.random.RandomState(0)
    mask = rng.rand(4, 8, 14, 14) < 0.3
    mask[:, 0] = True
    lengths = rlt.run_lengths(mask)
    assert (lengths.reshape(4, -1).sum(-1) == 8 * 14 * 14).all()
    assert ((lengths > 0) == mask).all()
    np.testing.assert_array_equal(np.asarray(jax.jit(rlt.run_lengths)(mask)), lengths)

  def test_token_order_not_the_release_bug(self):
    # One kept token at t=0 for (0,0) but a run of 1s elsewhere: a (y, x, t)-ordered
    # computation would assign (0,0)'s length 8 to some other token.
    mask = np.ones((1, 8, 2, 2), bool)
    mask[0, 1:, 0, 0] = False
    lengths = rlt.run_lengths(mask).reshape(-1)
    flat = mask.reshape(-1)
    assert lengths[flat].tolist()[:4] == [8, 1, 1, 1]


def selection_for(frames, policy="rlt", **kw):
  config = rlt.TokenizerConfig(policy=policy, **kw)
  return rlt.select_tokens(jnp.asarray(frames), config, tubelet_size=2, patch_size=16,
                           rng=jax.random.PRNGKey(0)), config


def moving_clips(batch=4, t=8, size=64, seed=0):
  """Static textures with a moving square whose size differs per clip."""
  rng = np.random.RandomState(seed)
  frames = np.repeat(rng.normal(size=(batch, 1, size, size, 3)), t, axis=1).astype(np.float32)
  for b in range(batch):
    for i in range(t):
      s = 8 + 8 * b
      frames[b, i, 4 * i:4 * i + s, 4 * i:4 * i + s] = 3.0
  return frames


class TestPolicies:

  def test_random_keeps_round_n_p_per_clip(self):
    sel, _ = selection_for(moving_clips(), policy="random", keep_fraction=0.3)
    n = 4 * 4 * 4
    assert rlt.random_keep_count(n, 0.3) == 19  # 19.2 → 19
    assert rlt.random_keep_count(5, 0.5) == 3  # halves round up
    assert np.asarray(sel.mask.sum(-1)).tolist() == [19] * 4
    assert len({tuple(np.nonzero(m)[0]) for m in np.asarray(sel.mask)}) == 4

  def test_none_keeps_everything(self):
    sel, _ = selection_for(moving_clips(), policy="none")
    assert bool(sel.mask.all())

  def test_config_errors_name_the_field(self):
    with pytest.raises(ValueError, match="tokenizer.policy='tome'"):
      rlt.TokenizerConfig(policy="tome")
    with pytest.raises(ValueError, match="tokenizer.overflow"):
      rlt.TokenizerConfig(overflow="ignore")
    with pytest.raises(ValueError, match="num_rows"):
      rlt.TokenizerConfig(packing=True)
    with pytest.raises(ValueError, match="keep_fraction"):
      rlt.TokenizerConfig(policy="random", keep_fraction=0.0)


class TestCompaction:

  def test_padded_rows_hold_kept_tokens_in_order_then_padding(self):
    sel, config = selection_for(moving_clips(), capacity=48)
    batch = rlt.compact(sel, config)
    mask = np.asarray(sel.mask)
    for b in range(4):
      kept = np.nonzero(mask[b])[0]
      k = len(kept)
      assert k <= 48
      assert np.asarray(batch.positions[b, :k]).tolist() == kept.tolist()
      assert (np.asarray(batch.segment_ids[b, :k]) == b + 1).all()
      assert (np.asarray(batch.segment_ids[b, k:]) == 0).all()
      assert (np.asarray(batch.patches[b, k:]) == 0).all()
      np.testing.assert_array_equal(batch.patches[b, :k], np.asarray(sel.patches)[b, kept])
      np.testing.assert_array_equal(batch.lengths[b, :k], np.asarray(sel.lengths)[b, kept])
    assert int(batch.num_overflow) == 0

  def test_packing_places_clips_greedily_and_agrees_with_the_host(self):
    sel, _ = selection_for(moving_clips())
    counts = np.asarray(sel.mask.sum(-1))
    rows = rlt.pack_rows_needed(counts, 64)
    config = rlt.TokenizerConfig(policy="rlt", packing=True, row_length=64, num_rows=rows)
    batch = rlt.compact(sel, config)
    assert int(batch.num_overflow) == 0
    seg = np.asarray(batch.segment_ids)
    assert (np.bincount(seg.ravel(), minlength=5)[1:] == counts).all()
    assert rows < 4  # packing saves rows over one row per clip
    for b in range(4):  # each clip's tokens sit contiguously in one row, in order
      r, c = np.nonzero(seg == b + 1)
      assert len(set(r)) == 1 and (np.diff(c) == 1).all()
      assert np.asarray(batch.positions)[r, c].tolist() == np.nonzero(sel.mask[b])[0].tolist()

  def test_overflow_is_counted_and_raised_outside_jit(self):
    sel, config = selection_for(moving_clips(), capacity=20)
    batch = jax.jit(rlt.compact, static_argnums=1)(sel, config)
    counts = np.asarray(sel.mask.sum(-1))
    assert int(batch.num_overflow) == int((counts > 20).sum()) > 0
    assert np.asarray(batch.placed).tolist() == np.minimum(counts, 20).tolist()
    with pytest.raises(OverflowError, match=r"clip\(s\) kept more tokens than fit"):
      rlt.raise_on_overflow(batch.num_overflow, config)

  def test_packing_overflow_is_counted(self):
    sel, _ = selection_for(moving_clips())
    config = rlt.TokenizerConfig(policy="rlt", packing=True, row_length=64, num_rows=1)
    batch = rlt.compact(sel, config)
    assert int(batch.num_overflow) >= 1
    assert int(batch.placed.sum()) <= 64

  def test_drop_least_changed_keeps_the_most_changed_tokens(self):
    sel, config = selection_for(moving_clips(), capacity=20, overflow="drop_least_changed")
    batch = rlt.compact(sel, config)
    scores, mask = np.asarray(sel.scores), np.asarray(sel.mask)
    for b in range(4):
      kept = np.asarray(batch.positions[b, :int(batch.placed[b])])
      assert (np.diff(kept) > 0).all()  # still in token order
      if mask[b].sum() > 20:
        dropped = np.setdiff1d(np.nonzero(mask[b])[0], kept)
        assert scores[b, dropped].max() <= scores[b, kept].min()
    assert int(batch.num_overflow) > 0  # still reported


class TestBuckets:

  def test_buckets_are_multiples_of_128_then_n(self):
    assert rlt.capacity_buckets(1568) == (128, 256, 384, 512, 640, 768, 896, 1024, 1152,
                                          1280, 1408, 1536, 1568)

  def test_choose_capacity_picks_the_smallest_that_fits(self):
    buckets = rlt.capacity_buckets(1568)
    assert rlt.choose_capacity([100, 700, 640], buckets) == 768
    assert rlt.choose_capacity(np.array([1568]), buckets) == 1568
    with pytest.raises(ValueError, match="largest bucket"):
      rlt.choose_capacity([2000], buckets)

  def test_pack_rows_needed(self):
    assert rlt.pack_rows_needed([60, 10, 50, 20], 64) == 3  # [60] [10, 50] [20]
    assert rlt.pack_rows_needed([64, 64], 64) == 2
    assert rlt.pack_rows_needed([], 64) == 0
