"""forward.py: two-phase inference (device mask and counts → host plan → compiled forward).

A mesh changes where the work runs, never the logits; each batch compiles once per distinct
plan; the policy decides which tokens each clip keeps, and the logits are those of exactly
those tokens.
"""

import jax
import numpy as np
import pytest

from rlt_jax import layout, rlt
from rlt_jax.data import input_pipeline
from rlt_jax.models import vit
from rlt_jax.runtime import sharding
from rlt_jax.training import forward
from test_layout import SPEC, N, clips, random_params, run

TS, P = SPEC.tubelet_size, SPEC.patch_size


@pytest.fixture(scope="module")
def model():
  return vit.build(SPEC)


@pytest.fixture(scope="module")
def params():
  return random_params(SPEC)


def rlt_counts(frames):
  return rlt.kept_counts(frames, rlt.Policy("rlt"), tubelet_size=TS, patch_size=P)


class TestMesh:

  @pytest.mark.parametrize("kind", layout.KINDS)
  def test_eight_devices_give_the_logits_of_one(self, model, params, kind):
    assert jax.device_count() == 8
    frames = np.concatenate([clips(seed=0), clips(seed=1)])  # 16 clips: 2 per device
    token_layout = layout.Layout(kind, capacity_step=8)
    mesh = sharding.make_mesh()
    sharded = forward.Forward(model, rlt.Policy("rlt"), token_layout, mesh)
    single = forward.Forward(model, rlt.Policy("rlt"), token_layout, None)
    logits, counts, plan = sharded(params, frames)
    want, want_counts, want_plan = single(params, frames)
    assert (plan.groups, plan.clips) == (8, 2) and (want_plan.groups, want_plan.clips) == (1, 16)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(counts, rlt_counts(frames))
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
    assert logits.shape == (16, SPEC.num_classes)
    assert len(logits.sharding.device_set) == 8

  def test_groups_are_the_batch_shards(self):
    assert sharding.batch_shards(None) == 1
    assert sharding.batch_shards(sharding.make_mesh()) == 8
    assert sharding.batch_shards(sharding.make_mesh(data=2, fsdp=4)) == 8
    assert sharding.batch_shards(sharding.make_mesh(data=4, devices=jax.devices()[:4])) == 4


class TestPlans:

  def test_one_compilation_per_distinct_plan(self, model, params):
    f = forward.Forward(model, rlt.Policy("rlt"), layout.Layout("padded", capacity_step=8))
    frames = clips(batch=4)  # kept counts 21, 26, 30, 34
    _, _, first = f(params, frames)
    f(params, frames)
    _, _, permuted = f(params, frames[::-1])  # other clips' order, same largest clip
    assert permuted == first and len(f.plans) == 1
    _, _, fewer = f(params, frames[[0, 1, 0, 1]])  # a smaller largest clip: another plan
    assert fewer != first and f.plans == {first, fewer}
    assert set(f.driver.compile_seconds) == f.plans  # what it reports is what it compiled
    assert f.driver.uses == {first: 3, fewer: 1}

  def test_order_by_cost_puts_similar_clips_together(self):
    counts = np.array([30, 10, 30, 20, 10])
    order = input_pipeline.order_by_cost(counts)
    assert order.tolist() == [1, 4, 3, 0, 2]  # ascending, ties in their original order


class TestPolicies:

  def test_none_keeps_every_token(self, model, params):
    f = forward.Forward(model, rlt.Policy("none"), layout.Layout("stream"))
    _, counts, plan = f(params, clips(batch=4))
    assert counts.tolist() == [N] * 4 and plan.length == 4 * N

  def test_random_keeps_round_n_p_per_clip(self, model, params):
    f = forward.Forward(model, rlt.Policy("random", keep_fraction=0.3),
                        layout.Layout("padded", capacity_step=8))
    frames = clips(batch=4)
    a, counts, plan = f(params, frames, rng=jax.random.PRNGKey(1))
    assert counts.tolist() == [round(0.3 * N)] * 4 == [19] * 4
    assert plan.capacity == 24
    b, _, _ = f(params, frames, rng=jax.random.PRNGKey(1))
    c, _, _ = f(params, frames, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)  # the rng decides the subset
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4

  def test_max_tokens_caps_counts_and_keeps_the_most_changed(self, model, params):
    cap = 28
    frames = clips(batch=4)  # RLT keeps 21, 26, 30, 34
    policy = rlt.Policy("rlt", max_tokens=cap)
    f = forward.Forward(model, policy, layout.Layout("stream", capacity_step=8))
    logits, counts, plan = f(params, frames)
    np.testing.assert_array_equal(counts, np.minimum(rlt_counts(frames), cap))
    np.testing.assert_array_equal(counts, rlt.kept_counts(frames, policy, tubelet_size=TS,
                                                          patch_size=P))
    # The cap most-changed of the kept tokens, chosen on the host from the change scores.
    normalised = rlt.normalize(frames)
    scores = rlt.change_scores(normalised, tubelet_size=TS, patch_size=P).reshape(4, N)
    mask = np.zeros((4, N), bool)
    for b in range(4):
      candidates = np.nonzero(scores[b] > policy.threshold)[0]
      mask[b, candidates[np.argsort(-scores[b, candidates], kind="stable")[:cap]]] = True
    _, device_mask, _ = forward.mask_clips(frames, policy, SPEC)
    np.testing.assert_array_equal(device_mask, mask)
    np.testing.assert_allclose(logits, run(model, params, normalised, mask, plan), atol=1e-5,
                               rtol=0)

  def test_padding_clips_keep_nothing(self, model, params):
    f = forward.Forward(model, rlt.Policy("rlt"), layout.Layout("stream"))
    valid = np.array([True, False, True, False])
    logits, counts, _ = f(params, clips(batch=4), valid=valid)
    assert counts[~valid].tolist() == [0, 0] and (counts[valid] > 0).all()
    assert np.isfinite(np.asarray(logits)).all()
