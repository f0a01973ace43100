"""models/tome.py: Token Merging (Bolya et al., ICLR 2023) on per-clip rows with padding.

The specification is `reference_step`: the paper's bipartite soft matching and size-weighted
merge on one clip's tokens, a loop in float64. A row of the JAX version, whatever its padding,
must give the same tokens in the same order as the reference on the row's valid tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax.models import tome


def reference_step(x, size, metric, r):
  """One ToMe step on one clip, no class token: tokens (n, D), sizes (n,), metric (n, C).

  As the paper's code: r = min(r, n // 2); cosine scores between A = tokens[0::2] and
  B = tokens[1::2]; each A token's best B; the r A tokens with the highest best scores merge
  into their best B (size-weighted mean, sizes add up). Output: kept A (in A order) then B.
  """
  x, size, metric = (np.asarray(a, np.float64) for a in (x, size, metric))
  n = len(x)
  r = min(r, n // 2)
  if r <= 0:
    return x, size
  unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = unit[0::2], unit[1::2]
  best_b, best_score = [], []
  for i in range(len(a)):
    scores = [float(a[i] @ b[j]) for j in range(len(b))]
    best_b.append(int(np.argmax(scores)))
    best_score.append(max(scores))
  by_score = sorted(range(len(a)), key=lambda i: -best_score[i])
  merged, kept = by_score[:r], sorted(by_score[r:])
  x_a, x_b, size_a, size_b = x[0::2], x[1::2], size[0::2], size[1::2]
  total, total_size = x_b * size_b[:, None], size_b.copy()
  for i in merged:
    total[best_b[i]] += x_a[i] * size_a[i]
    total_size[best_b[i]] += size_a[i]
  return (np.concatenate([x_a[kept], total / total_size[:, None]]),
          np.concatenate([size_a[kept], total_size]))


def margins(metric, r):
  """Smallest gap the reference's choices rely on: between each A token's best and second-best
  score, and between consecutive best scores. Cases are built with gaps far above float32
  rounding, so no choice is a tie."""
  n = len(metric)
  if min(r, n // 2) <= 0 or n < 4:
    return np.inf
  unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  scores = np.sort(unit[0::2] @ unit[1::2].T, axis=-1)
  gaps = [np.min(scores[:, -1] - scores[:, -2])] if scores.shape[1] > 1 else []
  best = np.sort(scores[:, -1])
  gaps.append(np.min(np.diff(best)) if len(best) > 1 else np.inf)
  return min(gaps)


def clip_case(rng, n, dim=8, channels=6, duplicates=2):
  """One clip's tokens, sizes and metric. A few A tokens are near-copies of B tokens (a
  little noise of distinct scales), so those merges are clear; resampled until no ties."""
  while True:
    x = rng.normal(size=(n, dim))
    size = rng.integers(1, 4, size=n).astype(np.float64)
    metric = rng.normal(size=(n, channels))
    for t in range(min(duplicates, n // 2)):
      i, j = 2 * rng.integers(0, (n + 1) // 2), 2 * rng.integers(0, n // 2) + 1
      metric[i] = metric[j] + (0.05 + 0.1 * t) * rng.normal(size=channels)
    if all(margins(metric, r) > 1e-3 for r in range(1, n // 2 + 1)):
      return x, size, metric


def rows_case(rng, counts, length, dim=8, channels=6, junk=np.nan):
  """Rows of `length` slots holding clips of `counts` tokens at random positions, padding
  filled with junk (NaN by default: it must not reach any valid output)."""
  batch = len(counts)
  x = np.full((batch, length, dim), junk, np.float32)
  metric = np.full((batch, length, channels), junk, np.float32)
  size = np.zeros((batch, length), np.float32)
  clips = []
  for row, n in enumerate(counts):
    clip = clip_case(rng, n, dim, channels)
    where = np.sort(rng.choice(length, size=n, replace=False))
    x[row, where], size[row, where], metric[row, where] = clip
    clips.append(tuple(np.asarray(a, np.float32) for a in clip))
  return x, size, metric, clips


@jax.jit(static_argnames="r")
def _step(x, size, metric, r):
  m = tome.bipartite_soft_matching(metric, size > 0, r)
  return *tome.merge(x, size, m), m


def step(x, size, metric, r):
  """One ToMe step under jit (the way a model runs it): x', size' as numpy, and the Merge."""
  x, size, m = _step(jnp.asarray(x), jnp.asarray(size), jnp.asarray(metric), r=r)
  return np.asarray(x), np.asarray(size), m


def assert_row_is_reference(x_row, size_row, want_x, want_size):
  live = size_row > 0
  np.testing.assert_allclose(size_row[live], want_size, rtol=1e-6)
  np.testing.assert_allclose(x_row[live], want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(x_row[~live], 0.0)  # padding: size 0, zeros, finite


def test_worked_example():
  """A = tokens 0, 2; B = tokens 1, 3; token 2 is a copy of 3, so 2 merges into 3."""
  metric = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]]])
  x, size = jnp.asarray([[[0.0], [1.0], [2.0], [3.0]]]), jnp.asarray([[1.0, 1.0, 1.0, 3.0]])
  m = tome.bipartite_soft_matching(metric, size > 0, 1)
  np.testing.assert_array_equal(m.unmerged, [[0]])
  np.testing.assert_array_equal(m.src, [[2]])
  np.testing.assert_array_equal(m.b[0, m.dst[0]], [3])
  x, size = tome.merge(x, size, m)
  np.testing.assert_allclose(x, [[[0.0], [1.0], [(2.0 + 3 * 3.0) / 4]]])  # kept A, then B
  np.testing.assert_allclose(size, [[1.0, 1.0, 4.0]])


@pytest.mark.parametrize("r", [1, 3, 5, 8])
def test_full_rows_match_the_reference(r):
  rng = np.random.default_rng(r)
  x, size, metric, clips = rows_case(rng, [16, 16, 16], 16)
  got_x, got_size, _ = step(x, size, metric, r)
  assert got_x.shape == (3, 16 - r, 8) and got_size.shape == (3, 16 - r)
  for row, clip in enumerate(clips):
    want_x, want_size = reference_step(*clip, r)
    np.testing.assert_allclose(got_size[row], want_size, rtol=1e-6)  # same order, no padding
    np.testing.assert_allclose(got_x[row], want_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [1, 2, 4, 7, 8])
def test_padded_rows_match_the_reference_on_their_valid_tokens(r):
  """Clips of every size, including rows with fewer valid merges than r (the rest of the r
  static merges only move padding) and empty rows; padding holds NaNs."""
  rng = np.random.default_rng(100 + r)
  counts = [0, 1, 2, 3, 4, 5, 8, 11, 12, 17, 18]
  x, size, metric, clips = rows_case(rng, counts, 18)
  got_x, got_size, _ = step(x, size, metric, r)
  assert got_x.shape == (len(counts), 18 - r, 8)
  assert np.isfinite(got_x).all()
  for row, clip in enumerate(clips):
    assert_row_is_reference(got_x[row], got_size[row], *reference_step(*clip, r))


def test_odd_row_lengths():
  rng = np.random.default_rng(7)
  counts = [15, 14, 9, 6, 1]
  x, size, metric, clips = rows_case(rng, counts, 15)
  for r in (1, 4, 7):
    got_x, got_size, _ = step(x, size, metric, r)
    for row, clip in enumerate(clips):
      assert_row_is_reference(got_x[row], got_size[row], *reference_step(*clip, r))


def test_several_blocks_follow_the_reference_chain():
  """Output order matters: the next block splits A and B by it. Each block gets a new metric
  (in the model: new keys), given to the reference for the same tokens in the same order."""
  rng = np.random.default_rng(3)
  counts, length = [20, 13, 7, 2], 20
  x, size, metric, clips = rows_case(rng, counts, length)
  want = [clip[:2] for clip in clips]
  for r in tome.schedule(3, 4, length):
    metric = np.full(x.shape[:2] + (6,), np.nan, np.float32)
    for row in range(len(counts)):
      live = size[row] > 0
      while True:
        fresh = rng.normal(size=(live.sum(), 6))
        if margins(fresh, r) > 1e-3:
          break
      metric[row, live] = fresh
      want[row] = reference_step(*want[row], fresh, r)
    x, size, _ = step(x, size, metric, r)
    for row in range(len(counts)):
      assert_row_is_reference(x[row], size[row], *want[row])
    x, size = np.where(size[..., None] > 0, x, np.nan), size  # padding junk again


def test_padding_is_never_merged_and_every_token_lands_once():
  """With x = one-hot of the input slot and size 1, x' * size' counts the input tokens each
  output slot stands for. Padding metrics copy a valid token's, the best match if unmasked."""
  rng = np.random.default_rng(5)
  batch, length = 4, 12
  valid = rng.random((batch, length)) < 0.5
  valid[0] = True
  metric = rng.normal(size=(batch, length, 4)).astype(np.float32)
  for row in range(batch):
    first = np.flatnonzero(valid[row])[0] if valid[row].any() else 0
    metric[row, ~valid[row]] = metric[row, first]
  x = np.broadcast_to(np.eye(length, dtype=np.float32), (batch, length, length))
  size = valid.astype(np.float32)
  for r in range(length // 2 + 1):
    got_x, got_size, m = step(x, size, metric, r)
    sources = got_x * got_size[..., None]  # (B, N - r, N): which inputs each slot holds
    np.testing.assert_allclose(sources.sum(axis=1), valid, atol=1e-6)  # each valid once
    np.testing.assert_array_equal(sources[~np.broadcast_to(valid[:, None], sources.shape)], 0)
    np.testing.assert_allclose(got_size, sources.sum(axis=-1), atol=1e-6)
    # Where B has padding, merges onto valid B tokens only come from valid A tokens (else
    # padding A adds its zero to a valid B).
    src_valid = np.take_along_axis(valid, np.asarray(m.src), axis=1)
    dst_valid = np.take_along_axis(valid, np.take_along_axis(np.asarray(m.b), np.asarray(m.dst),
                                                             axis=1), axis=1)
    b_has_padding = valid.sum(axis=1) // 2 < length // 2
    assert not (dst_valid & ~src_valid)[b_has_padding].any()


def test_rows_are_independent():
  """Merging never crosses rows: each row alone gives the same (bitwise) as in the batch."""
  rng = np.random.default_rng(11)
  x, size, metric, _ = rows_case(rng, [10, 4, 7], 10, junk=0.0)
  batch_x, batch_size, _ = step(x, size, metric, 4)
  for row in range(3):
    one_x, one_size, _ = step(x[row:row + 1], size[row:row + 1], metric[row:row + 1], 4)
    np.testing.assert_array_equal(one_x[0], batch_x[row])
    np.testing.assert_array_equal(one_size[0], batch_size[row])


def test_merging_preserves_weighted_sums_and_the_pooled_mean():
  """The key invariant: sum(x * size) and sum(size) of each row are unchanged by merging, so
  the size-weighted mean of a merged row is the plain mean of the clip's original tokens."""
  rng = np.random.default_rng(13)
  counts, length = [24, 17, 5, 1], 24
  x, _, metric, _ = rows_case(rng, counts, length)
  size = np.where(np.isnan(x[..., 0]), 0.0, 1.0).astype(np.float32)
  want = np.stack([np.nanmean(x[row], axis=0) for row in range(len(counts))])
  pooled = jax.jit(tome.weighted_mean)
  for r in tome.schedule(4, 5, length):
    metric = rng.normal(size=x.shape[:2] + (6,)).astype(np.float32)
    x, size, _ = step(x, size, metric, r)
    np.testing.assert_allclose(size.sum(axis=-1), counts)
    np.testing.assert_allclose(pooled(x, size), want, rtol=1e-5, atol=1e-6)
  assert x.shape[1] == tome.token_counts(length, tome.schedule(4, 5, length))[-1]


def test_attention_bias_is_proportional_and_ignores_padding():
  """softmax(logits + log size) over keys = softmax over the keys repeated size times; padding
  keys get exactly zero weight however large their logits, and a padding-only row stays finite."""
  rng = np.random.default_rng(17)
  size = np.asarray([[3.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  logits = rng.normal(size=(2, 4)).astype(np.float32)
  logits[0, 2] = 1e4
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits) + tome.attention_bias(jnp.asarray(size))))
  repeated = np.repeat(logits[0], size[0].astype(int))
  expanded = np.exp(repeated - repeated.max())
  expanded /= expanded.sum()
  want = [expanded[np.repeat(np.arange(4), size[0].astype(int)) == k].sum() for k in range(4)]
  np.testing.assert_allclose(probs[0], want, rtol=1e-5)
  assert probs[0, 2] == 0.0
  assert np.isfinite(probs[1]).all()
  assert np.isfinite(tome.attention_bias(jnp.asarray(size), jnp.bfloat16)).all()


def test_weighted_mean_ignores_padding():
  x = jnp.asarray([[[1.0], [3.0], [jnp.nan]], [[jnp.nan], [jnp.nan], [jnp.nan]]])
  size = jnp.asarray([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(tome.weighted_mean(x, size), [[2.5], [0.0]])


def test_metric_is_keys_averaged_over_heads():
  k = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(tome.metric_from_keys(k), np.asarray(k).mean(axis=2))


def test_jit_with_static_r():
  rng = np.random.default_rng(19)
  x, size, metric, _ = rows_case(rng, [12, 5], 12, junk=0.0)

  @jax.jit
  def block(x, size, metric):
    m = tome.bipartite_soft_matching(metric, size > 0, 3)
    return tome.merge(x, size, m)

  match = jax.jit(tome.bipartite_soft_matching, static_argnames="r")
  got_x, got_size = block(x, size, metric)
  want_x, want_size, _ = step(x, size, metric, 3)
  assert got_x.shape == (2, 9, 8)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got_size, want_size)
  m = match(jnp.asarray(metric), jnp.asarray(size) > 0, r=3)
  assert m.r == 3 and m.unmerged.shape == (2, 3) and m.b.shape == (2, 6)


def test_gradients_are_finite_with_padding():
  rng = np.random.default_rng(23)
  x, size, metric, _ = rows_case(rng, [8, 3, 0], 8, junk=0.0)
  m = tome.bipartite_soft_matching(jnp.asarray(metric), jnp.asarray(size) > 0, 3)

  def loss(x, size):
    x, size = tome.merge(x, size, m)
    return tome.weighted_mean(x, size).sum() + (x ** 2).sum()

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(size))
  assert all(np.isfinite(g).all() for g in grads)


def test_low_precision_inputs_keep_their_dtype():
  rng = np.random.default_rng(29)
  x, size, metric, _ = rows_case(rng, [10, 6], 10, junk=0.0)
  got_x, got_size, _ = _step(jnp.asarray(x, jnp.bfloat16), jnp.asarray(size),
                             jnp.asarray(metric, jnp.bfloat16), r=2)
  assert got_x.dtype == jnp.bfloat16 and got_size.dtype == jnp.float32


def test_untouched_tokens_pass_through_bitwise():
  rng = np.random.default_rng(31)
  x, size, metric, _ = rows_case(rng, [10], 10, junk=0.0)
  got_x, _, m = step(x, size, metric, 2)
  np.testing.assert_array_equal(got_x[0, :3], x[0, np.asarray(m.unmerged[0])])
  untouched = np.setdiff1d(np.arange(5), np.asarray(m.dst[0]))
  np.testing.assert_array_equal(got_x[0, 3 + untouched], x[0, np.asarray(m.b[0, untouched])])


def test_r_zero_is_the_identity():
  rng = np.random.default_rng(37)
  x, size, metric, _ = rows_case(rng, [6, 3], 6)
  x, size = jnp.asarray(x), jnp.asarray(size)
  m = tome.bipartite_soft_matching(jnp.asarray(metric), size > 0, 0)
  assert m.r == 0
  np.testing.assert_array_equal(m.unmerged, np.broadcast_to(np.arange(6), (2, 6)))
  got_x, got_size = tome.merge(x, size, m)
  assert got_x is x and got_size is size
  assert tome.reorder(size, m) is size


def test_reorder_carries_per_token_values():
  rng = np.random.default_rng(41)
  x, size, metric, _ = rows_case(rng, [8, 5], 8, junk=0.0)
  m = tome.bipartite_soft_matching(jnp.asarray(metric), jnp.asarray(size) > 0, 3)
  ids = jnp.broadcast_to(jnp.arange(8), (2, 8))
  np.testing.assert_array_equal(tome.reorder(ids, m), np.concatenate([m.unmerged, m.b], axis=1))


def test_r_above_half_the_row_is_refused():
  with pytest.raises(ValueError, match="r=5 on rows of 9"):
    tome.bipartite_soft_matching(jnp.zeros((1, 9, 2)), jnp.ones((1, 9), bool), 5)


def test_half_the_row_with_an_odd_clip_moves_the_kept_token():
  """r = N / 2 exhausts A; the reference keeps one A token of an odd clip, which is moved to B's
  first padding slot: the same tokens as the reference, that one last (`schedule` avoids it)."""
  rng = np.random.default_rng(43)
  x, size, metric, clips = rows_case(rng, [7, 1], 10)
  got_x, got_size, _ = step(x, size, metric, 5)
  for row, clip in enumerate(clips):
    want_x, want_size = reference_step(*clip, 5)
    live = got_size[row] > 0
    np.testing.assert_allclose(got_size[row][live], np.roll(want_size, -1), rtol=1e-6)
    np.testing.assert_allclose(got_x[row][live], np.roll(want_x, -1, axis=0), rtol=1e-5,
                               atol=1e-5)


def test_schedule():
  assert tome.schedule(0, 12, 1568) == (0,) * 12
  assert tome.schedule(100, 4, 1568) == (100,) * 4
  # Clipped so that every block keeps more than half its row, and at least min_tokens.
  assert tome.schedule(10, 4, 12) == (5, 3, 1, 1)
  assert tome.schedule(10, 3, 2) == (0, 0, 0)
  assert tome.schedule(4, 3, 10, min_tokens=7) == (3, 0, 0)
  assert tome.schedule([1, 2, 3], 3, 100) == (1, 2, 3)
  for r, depth, n in [(7, 12, 50), (300, 24, 1568), ([9, 0, 40, 3], 4, 30)]:
    rs = tome.schedule(r, depth, n)
    counts = tome.token_counts(n, rs)
    assert len(rs) == depth and len(counts) == depth + 1 and counts[0] == n
    assert all(0 <= v <= (c - 1) // 2 for v, c in zip(rs, counts))
    assert all(c - v == nxt >= 1 for v, c, nxt in zip(rs, counts, counts[1:]))
  assert tome.token_counts(1568, (100, 100)) == (1568, 1468, 1368)
  with pytest.raises(ValueError, match="3 entries for 2 blocks"):
    tome.schedule([1, 2, 3], 2, 100)
  with pytest.raises(ValueError, match="non-negative"):
    tome.schedule(-1, 2, 100)
