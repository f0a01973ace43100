"""augment.py: Mixup/CutMix and erasing as the release does them, and keep masks carried
through them (rlt.mask_before_mix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax import rlt
from rlt_jax.training import augment

CUTMIX = augment.Augment(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0)
MIXUP = augment.Augment(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0)
ERASE = augment.Augment(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=1.0)


def test_mixing_keeps_targets_normalised_and_cutmix_boxes_cover_every_frame():
  frames = jnp.stack([jnp.zeros((4, 16, 16, 3)), jnp.ones((4, 16, 16, 3))])
  mixed, targets, mixing = augment.mix(jax.random.PRNGKey(3), frames, jnp.array([0, 1]),
                                       CUTMIX)
  assert bool(mixing.applied) and bool(mixing.cutmix)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  area = float(mixed[0, 0, ..., 0].mean())  # clip 0 (zeros) got a box of ones
  np.testing.assert_allclose(targets[0, 1], area * 0.9 + 0.02, rtol=1e-5)
  np.testing.assert_array_equal(mixed[0, 0, ..., 0] == 1, mixing.box)  # the box it reports
  for t in range(4):
    np.testing.assert_array_equal(mixed[0, t], mixed[0, 0])
  erased, where = augment.erase(jax.random.PRNGKey(0), frames, ERASE)
  assert not np.array_equal(erased, frames) and where.any()
  np.testing.assert_array_equal(erased[:, 0, ..., 0] != frames[:, 0, ..., 0], where)
  for t in range(4):  # the noise is static over time, so RLT keeps it once
    np.testing.assert_array_equal(erased[:, t], erased[:, 0])


def clips(seed=0, batch=4, frames=8, size=64):
  """Normalised clips whose 16² patches are either still or busy (a different random image
  every frame), chosen at random: RLT keeps exactly the busy ones (after tubelet 0)."""
  rng = np.random.default_rng(seed)
  still = np.repeat(rng.normal(size=(batch, 1, size, size, 3)), frames, axis=1)
  busy = rng.normal(size=(batch, frames, size, size, 3))
  choice = rng.random((batch, 1, size // 16, 1, size // 16, 1, 1)) < 0.5
  choice = np.broadcast_to(choice, (batch, frames, size // 16, 16, size // 16, 16, 3))
  out = np.where(choice.reshape(batch, frames, size, size, 3), busy, still)
  return jnp.asarray(out, jnp.float32)


def masks(frames):
  return rlt.keep_mask(frames, threshold=0.1)


@pytest.mark.parametrize("seed", range(4))
def test_under_cutmix_each_patch_wholly_in_one_source_gets_that_sources_decision(seed):
  """A patch wholly inside or outside the box shows exactly one source's pixels, so RLT on the
  mixed clip decides what the carried mask says; on the box's edge it keeps either's."""
  frames = clips(seed)
  mixed, _, mixing = augment.mix(jax.random.PRNGKey(seed), frames, jnp.arange(4), CUTMIX)
  carried = augment.carry_mask(masks(frames), mixing, jnp.zeros((4, 64, 64), bool),
                               patch_size=16)
  after = masks(mixed)
  inside, touched = augment._coverage(mixing.box, 16)
  whole = np.asarray(inside | ~touched)  # (h, w): patches from one source only
  np.testing.assert_array_equal(np.asarray(carried)[:, :, whole], np.asarray(after)[:, :, whole])
  edge = np.asarray(touched & ~inside)
  either = np.asarray(masks(frames) | masks(frames)[::-1])
  np.testing.assert_array_equal(np.asarray(carried)[:, :, edge], either[:, :, edge])


def test_under_mixup_a_token_is_kept_if_either_source_keeps_it():
  frames = clips(1)
  mixed, _, mixing = augment.mix(jax.random.PRNGKey(1), frames, jnp.arange(4), MIXUP)
  assert bool(mixing.applied) and not bool(mixing.cutmix)
  carried = augment.carry_mask(masks(frames), mixing, jnp.zeros((4, 64, 64), bool),
                               patch_size=16)
  np.testing.assert_array_equal(carried, masks(frames) | masks(frames)[::-1])
  assert int(carried.sum()) >= int(masks(mixed).sum())  # blending never adds change


def test_an_erased_patch_keeps_only_its_first_tubelet_as_on_the_erased_clip():
  frames = clips(2, size=128)  # boxes of 2–33% of 128² cover whole 16² patches
  erased, where = augment.erase(jax.random.PRNGKey(5), frames, ERASE)
  none = augment.Mixing(jnp.bool_(False), jnp.bool_(False), jnp.zeros((128, 128), bool))
  carried = augment.carry_mask(masks(frames), none, where, patch_size=16)
  blanked, touched = augment._coverage(where, 16)
  assert bool(blanked.any())
  np.testing.assert_array_equal(np.asarray(carried)[np.asarray(blanked)[:, None].repeat(4, 1)],
                                np.asarray(masks(erased))[np.asarray(blanked)[:, None]
                                                          .repeat(4, 1)])
  untouched = ~np.asarray(touched)[:, None].repeat(4, 1)
  np.testing.assert_array_equal(np.asarray(carried)[untouched], np.asarray(masks(frames))[
      untouched])


def test_without_mixing_the_mask_is_the_clips_own():
  frames = clips(3)
  _, _, mixing = augment.mix(jax.random.PRNGKey(0), frames, jnp.arange(4),
                             augment.Augment(num_classes=5, mix_prob=0.0))
  carried = augment.carry_mask(masks(frames), mixing, jnp.zeros((4, 64, 64), bool),
                               patch_size=16)
  np.testing.assert_array_equal(carried, masks(frames))
