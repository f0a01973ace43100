"""checkpoint.py: training checkpoints restore intact, or an earlier intact one does."""

import json
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax.checkpoints import checkpoint


def state(value=1.0):
  return {"params": {"w": jnp.full((4, 3), value, jnp.float32), "b": jnp.zeros(3)},
          "step": jnp.int32(7), "rng": jax.random.PRNGKey(3)}


def data_iterator():
  return iter(grain.MapDataset.range(10).to_iter_dataset())


def saved(tmp_path, *states):
  """A TrainCheckpoints with `states` saved at steps 1, 2, …"""
  manager = checkpoint.TrainCheckpoints(str(tmp_path / "checkpoints"), keep=5)
  it = data_iterator()
  for step, s in enumerate(states, 1):
    manager.save(step, s, it.get_state())
  manager.wait()
  return manager


def restore(manager):
  abstract = jax.eval_shape(state)
  shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(
      jax.devices()[0]), abstract)
  return manager.restore(abstract, shardings, data_iterator())


def test_the_fingerprint_sees_any_changed_value_and_not_the_sharding():
  s = state()
  w = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
  s["params"]["w"] = w
  base = np.asarray(checkpoint.fingerprint(s))
  for changed in (w.at[2, 1].set(np.nextafter(np.float32(7), np.float32(8))),  # one ulp
                  w.at[0, 0].set(w[0, 1]).at[0, 1].set(w[0, 0]),  # two values swapped
                  w.T.reshape(4, 3)):  # the same values elsewhere
    other = np.asarray(checkpoint.fingerprint(dict(s, params=dict(s["params"], w=changed))))
    assert (other != base).any()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1), ("a", "b"))
  sharded = jax.device_put(s, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  sharded["params"]["w"] = jax.device_put(
      w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a")))
  np.testing.assert_array_equal(np.asarray(checkpoint.fingerprint(sharded)), base)


def test_an_intact_checkpoint_restores_as_saved(tmp_path):
  manager = saved(tmp_path, state(1.0), state(2.0))
  restored, _, step = restore(manager)
  assert step == 2 and float(restored["params"]["w"][0, 0]) == 2.0
  manager.close()


def test_arrays_that_differ_from_their_checksums_fall_back_to_the_previous_checkpoint(
    tmp_path, caplog):
  manager = saved(tmp_path, state(1.0), state(2.0))
  sums = tmp_path / "checkpoints" / "2" / "checksums" / "metadata"
  recorded = json.loads(sums.read_text())
  recorded["fingerprint"][0][0] ^= 1  # as if the data had changed since
  sums.write_text(json.dumps(recorded))
  restored, _, step = restore(manager)
  assert step == 1 and float(restored["params"]["w"][0, 0]) == 1.0
  assert "newest intact one (step 2: 1 of its 4 arrays differ from their checksums" in (
      caplog.text)
  manager.close()


def test_non_finite_values_are_never_resumed_from(tmp_path):
  manager = saved(tmp_path, state(1.0), state(math.nan))
  _, _, step = restore(manager)
  assert step == 1
  manager.close()


def test_when_none_restores_the_error_lists_why_and_nothing_is_touched(tmp_path):
  manager = saved(tmp_path, state(math.inf), state(math.nan))
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(checkpoint.NoRestorableCheckpoint,
                     match=r"\(step 2: it holds values that are not finite; step 1: .*\); they "
                           r"are left as they are"):
    restore(manager)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
  manager.close()
