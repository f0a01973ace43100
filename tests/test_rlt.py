"""rlt.py: the keep rule, run lengths, and the token policies (which tokens a clip keeps)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rlt_jax import rlt


def reference_keep_mask(frames, tau, ts, p):
  """The rule of docs/rlt.md, written as plainly as possible (float64 loops)."""
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


def drifting_patch(step, frames=16, size=32):
  """Normalised clips (1, frames, size, size, 3): still zeros, but patch (0, 0) (16 × 16)
  brightens by `step` every frame, so it drifts steadily."""
  clip = np.zeros((1, frames, size, size, 3), np.float32)
  clip[0, :, :16, :16] = step * np.arange(frames)[:, None, None, None]
  return clip


class TestDriftFreeRuns:
  """reference='run_start': a tubelet is compared with the start of its run, not only with
  its predecessor (docs/rlt.md, "Drift-free runs")."""

  def test_slow_drift_is_dropped_by_the_release_and_kept_when_it_adds_up(self):
    clip = drifting_patch(0.03)  # 3 frames apart per compared pair: 0.09 < τ = 0.1
    previous = rlt.keep_mask(clip, threshold=0.1)[0, :, 0, 0]
    run_start = rlt.keep_mask(clip, threshold=0.1, reference="run_start")[0, :, 0, 0]
    assert previous.tolist() == [True] + [False] * 7  # one token for the whole drift
    assert run_start.tolist() == [True, False, True, False, True, False, True, False]
    # each kept token starts a run when the change since the last one's frame exceeds τ:
    # tubelet 2's last frame (5) is 5 × 0.03 = 0.15 from frame 0, where the first run began
    scores = rlt.change_scores(clip, reference="run_start", threshold=0.1)[0, :, 0, 0]
    np.testing.assert_allclose(scores[1:4], [0.09, 0.15, 0.09], rtol=1e-6)
    assert (rlt.run_lengths(run_start[None, :, None, None])[0, :, 0, 0] == [2, 0] * 4).all()
    assert not rlt.keep_mask(clip, reference="run_start")[0, 1:, 1:, 1:].any()  # still parts

  def test_it_is_the_release_rule_wherever_every_tubelet_is_kept_or_nothing_moves(self):
    rng = np.random.default_rng(0)
    busy = rng.normal(size=(2, 8, 32, 32, 3)).astype(np.float32)  # everything changes
    still = np.repeat(busy[:, :1], 8, axis=1)
    for frames in (busy, still):
      np.testing.assert_array_equal(rlt.keep_mask(frames, reference="run_start"),
                                    rlt.keep_mask(frames))

  def test_numpy_and_jit_agree(self):
    clip = np.concatenate([drifting_patch(0.03), drifting_patch(0.07)])
    jitted = jax.jit(lambda f: rlt.keep_mask(f, threshold=0.1, reference="run_start"))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(clip))),
                                  rlt.keep_mask(clip, threshold=0.1, reference="run_start"))

  def test_run_start_needs_the_threshold(self):
    with pytest.raises(ValueError, match="needs the threshold"):
      rlt.change_scores(drifting_patch(0.03), reference="run_start")


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


def moving_clips(batch=4, t=8, size=64, seed=0):
  """Normalised-scale float clips: static textures with a moving square of per-clip size."""
  rng = np.random.RandomState(seed)
  frames = np.repeat(rng.normal(size=(batch, 1, size, size, 3)), t, axis=1).astype(np.float32)
  for b in range(batch):
    for i in range(t):
      s = 8 + 8 * b
      frames[b, i, 4 * i:4 * i + s, 4 * i:4 * i + s] = 3.0
  return frames


def select(frames, policy, **kw):
  return np.asarray(rlt.select(jnp.asarray(frames), policy, tubelet_size=2, patch_size=16,
                               **kw))


class TestSelect:

  def test_rlt_is_the_keep_mask_in_t_y_x_order(self):
    frames = moving_clips()
    mask = select(frames, rlt.Policy("rlt", threshold=0.1))
    assert mask.shape == (4, 4 * 4 * 4)
    want = rlt.keep_mask(frames, threshold=0.1).reshape(4, -1)
    np.testing.assert_array_equal(mask, want)
    assert 16 < want.sum(-1).min() and want.sum(-1).max() < 64  # RLT really drops tokens

  def test_reproduces_the_release_mask_through_select(self, fixtures_dir):
    data = np.load(fixtures_dir / "videomae2_tiny_expected.npz")
    mask = select(rlt.normalize(data["frames"]), rlt.Policy("rlt", threshold=0.1))
    np.testing.assert_array_equal(mask, data["mask"])

  def test_none_keeps_everything(self):
    assert select(moving_clips(), rlt.Policy("none")).all()

  def test_random_keeps_round_n_p_per_clip(self):
    mask = select(moving_clips(), rlt.Policy("random", keep_fraction=0.3),
                  rng=jax.random.PRNGKey(0))
    n = 4 * 4 * 4
    assert rlt.random_keep_count(n, 0.3) == 19  # 19.2 → 19
    assert rlt.random_keep_count(5, 0.5) == 3  # halves round up
    assert rlt.random_keep_count(3, 0.1) == 1  # never nothing
    assert mask.sum(-1).tolist() == [19] * 4
    assert len({tuple(np.nonzero(m)[0]) for m in mask}) == 4  # a subset per clip
    again = select(moving_clips(), rlt.Policy("random", keep_fraction=0.3),
                   rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(mask, again)

  def test_random_needs_an_rng(self):
    with pytest.raises(ValueError, match="needs an rng"):
      select(moving_clips(), rlt.Policy("random"))

  @pytest.mark.parametrize("kind", ["none", "rlt"])
  def test_max_tokens_keeps_the_most_changed_of_the_kept(self, kind):
    frames = moving_clips()
    cap = 24
    mask = select(frames, rlt.Policy(kind, max_tokens=cap))
    uncapped = select(frames, rlt.Policy(kind))
    scores = rlt.change_scores(frames).reshape(4, -1)
    np.testing.assert_array_equal(mask.sum(-1), np.minimum(uncapped.sum(-1), cap))
    assert (mask <= uncapped).all()  # only ever drops
    for b in range(4):
      dropped = uncapped[b] & ~mask[b]
      if dropped.any():
        assert scores[b, dropped].max() <= scores[b, mask[b]].min()
    assert (uncapped.sum(-1) > cap).any()  # the cap did act

  @pytest.mark.parametrize("policy", [rlt.Policy("none"), rlt.Policy("rlt"),
                                      rlt.Policy("random"), rlt.Policy("rlt", max_tokens=20)])
  def test_invalid_clips_keep_no_token(self, policy):
    valid = jnp.asarray([True, False, True, False])
    mask = select(moving_clips(), policy, rng=jax.random.PRNGKey(0), valid=valid)
    assert not mask[1].any() and not mask[3].any()
    np.testing.assert_array_equal(
        mask[[0, 2]], select(moving_clips(), policy, rng=jax.random.PRNGKey(0))[[0, 2]])

  @pytest.mark.parametrize("policy", [rlt.Policy("none"), rlt.Policy("rlt"),
                                      rlt.Policy("random", keep_fraction=0.4),
                                      rlt.Policy("rlt", max_tokens=20),
                                      rlt.Policy("none", max_tokens=20),
                                      rlt.Policy("rlt", reference="run_start")])
  def test_host_counts_equal_the_device_masks(self, policy):
    rng = np.random.RandomState(0)
    frames = np.repeat(rng.randint(0, 256, (4, 1, 64, 64, 3)), 8, axis=1).astype(np.uint8)
    for b in range(4):
      for i in range(8):
        frames[b, i, 4 * i:4 * i + 8 + 8 * b, 4 * i:4 * i + 8 + 8 * b] = 255
    counts = rlt.kept_counts(frames, policy, tubelet_size=2, patch_size=16)
    assert counts.dtype == np.int32
    device = select(rlt.normalize(frames), policy, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(counts, device.sum(-1))

  @pytest.mark.parametrize("fields,match", [
      (dict(kind="tome"), "rlt.policy='tome'"),
      (dict(threshold=float("nan")), "rlt.threshold=nan"),
      (dict(threshold=-0.1), "rlt.threshold=-0.1"),
      (dict(kind="random", keep_fraction=0.0), "keep_fraction"),
      (dict(kind="random", keep_fraction=1.5), "keep_fraction"),
      (dict(max_tokens=0), "rlt.max_tokens=0"),
      (dict(max_tokens=2.5), "rlt.max_tokens=2.5"),
      (dict(reference="first"), "rlt.reference='first': expected one of"),
  ])
  def test_policy_errors_name_the_field(self, fields, match):
    with pytest.raises(ValueError, match=match):
      rlt.Policy(**fields)
