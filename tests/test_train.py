"""train.py / main.py: the step, sharding, resumption to the batch, faults, bad configs."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlt_jax.data import input_pipeline, synthetic, tfrecord
from rlt_jax.models import vit
from rlt_jax.runtime import files, sharding
from rlt_jax.training import augment, configure, optim, train
import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(out), train_videos=48, val_videos=16, size=40, num_frames=12,
                     videos_per_shard=16)
  return str(out)


def losses(workdir, key="losses"):
  """The loss (or another logged value) of every step in metrics.jsonl, with log_every=1
  (a re-run step keeps its last value)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "losses" in record:
        out[record["step"]] = record["losses"][-1] if key == "losses" else record[key]
  return out


def main_command(data_dir, workdir, *extra):
  return [sys.executable, "-m", "rlt_jax.main", f"--config={TINY}:{data_dir}",
          f"--workdir={workdir}", *extra]


def env(devices=8):
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                     "--xla_cpu_collective_timeout_seconds=900 "
                     "--xla_cpu_collective_call_terminate_timeout_seconds=900")
  e["PYTHONPATH"] = os.pathsep.join([ROOT, e.get("PYTHONPATH", "")])
  return e


def run_main(data_dir, workdir, *extra, devices=8):
  return subprocess.run(main_command(data_dir, workdir, *extra), env=env(devices),
                        capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------ the optimizer


def test_layer_decay_is_applied_and_weight_decay_skips_vectors_and_tables():
  params = {"patch_embed": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "length_embedding": jnp.ones((4, 3)),
            "blocks_0": {"mlp": {"fc1": {"kernel": jnp.ones((3, 3))}}},
            "blocks_1": {"norm1": {"scale": jnp.ones(3)}},
            "head": {"kernel": jnp.ones((3, 8))}}
  scales = optim.layer_scales(params, depth=2, decay=0.5)
  assert scales["patch_embed"]["kernel"] == 0.5 ** 3 and scales["length_embedding"] == 0.5 ** 3
  assert scales["blocks_0"]["mlp"]["fc1"]["kernel"] == 0.5 ** 2
  assert scales["blocks_1"]["norm1"]["scale"] == 0.5 and scales["head"]["kernel"] == 1.0
  mask = optim.decay_mask(params)
  assert mask["patch_embed"] == {"kernel": True, "bias": False}
  assert not mask["length_embedding"] and not mask["blocks_1"]["norm1"]["scale"]
  assert mask["head"]["kernel"]


def test_stacked_blocks_get_the_factors_and_mask_of_their_unrolled_slices():
  """model.scan stacks block i at index i: the optimizer treats each slice as block i."""
  params = {"patch_embed": {"kernel": jnp.ones((2, 3))},
            **{f"blocks_{i}": {"mlp": {"fc1": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}},
                               "norm1": {"scale": jnp.ones(3)}} for i in range(3)},
            "head": {"kernel": jnp.ones((3, 8))}}
  stacked = vit.arrange_blocks(params, scan=True)
  unrolled_scales = optim.layer_scales(params, depth=3, decay=0.5)
  scales = optim.layer_scales(stacked, depth=3, decay=0.5)
  for i in range(3):
    want = unrolled_scales[f"blocks_{i}"]["mlp"]["fc1"]["kernel"]
    assert np.all(np.broadcast_to(scales["blocks"]["mlp"]["fc1"]["kernel"], (3, 3, 3))[i]
                  == want)
  assert scales["head"]["kernel"] == 1.0 and scales["patch_embed"]["kernel"] == 0.5 ** 4
  mask = optim.decay_mask(stacked)
  assert mask["blocks"]["mlp"]["fc1"] == {"kernel": True, "bias": False}
  assert not mask["blocks"]["norm1"]["scale"]


def test_a_scanned_model_trains_exactly_like_unrolled_blocks():
  """One step with layer decay and weight decay on: same loss, same new parameters."""
  config = tiny_config.get_config("unused")
  config.model.update(depth=3, drop_path=0.0)
  config.optim.layer_decay = 0.75
  rng = np.random.default_rng(2)
  batch = {"frames": rng.integers(0, 255, (8, 4, 32, 32, 3), np.uint8),
           "label": rng.integers(0, 8, 8).astype(np.int32), "valid": np.ones(8, bool)}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  results = {}
  for scan in (False, True):
    config.model.scan = scan
    state, metrics, _, _ = one_step(mesh, config, batch)
    results[scan] = vit.arrange_blocks(state["params"], scan=False), metrics["loss"]
  np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         results[True][0], results[False][0])


def test_the_schedule_warms_up_then_decays_to_the_scaled_minimum():
  config = tiny_config.get_config("unused")
  config.batch_size = 512
  config.optim.lr = 1.5e-3
  lr = optim.schedule(config, total_steps=100, warmup_steps=10)
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(1.5e-3 * 2)
  assert float(lr(100)) == pytest.approx(1e-6 * 2, rel=1e-3)


# ------------------------------------------------------------------ sharding


def one_step(mesh, config, batch, mask_before_mix=False, augmentation=None):
  spec = configure.model_spec(config)
  model = configure.build_model(config, spec, train=True)
  rng = jax.random.PRNGKey(0)
  params = vit.build(spec).init(rng, vit.example_tokens(spec))["params"]  # unrolled …
  params = vit.arrange_blocks(params, configure.scans(config))  # … whatever model.scan says
  tx, lr = optim.make(config, params, depth=spec.depth, total_steps=10, warmup_steps=0)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(3), "rng": rng,
           "bad_step": jnp.int32(-1)}
  shardings = sharding.tree_shardings(mesh, state, min_size=16)
  step = train.TrainStep(model, tx, lr, augmentation or augment.Augment(num_classes=8),
                         configure.token_policy(config),
                         configure.token_layout(config), config.grad_accum_steps, mesh, shardings,
                         mask_before_mix=mask_before_mix)
  state, metrics = step(jax.device_put(state, shardings), sharding.global_batch(mesh, batch))
  return jax.device_get(state), jax.device_get(metrics), shardings, step


@pytest.mark.parametrize("accum,kind", [(1, "stream"), (2, "stream"), (1, "padded")])
def test_a_step_sharded_over_data_and_fsdp_equals_the_step_on_one_device(accum, kind):
  config = tiny_config.get_config("unused")
  config.grad_accum_steps = accum
  config.layout.kind = kind
  size = 8 * accum  # every micro-batch spans the 8 devices
  rng = np.random.default_rng(0)
  batch = {"frames": rng.integers(0, 255, (size, 4, 32, 32, 3), np.uint8),
           "label": rng.integers(0, 8, size).astype(np.int32), "valid": np.ones(size, bool)}
  batch["frames"][:, :, :16] = batch["frames"][:, :1, :16]  # static top half: RLT drops it
  batch["frames"][:3] = batch["frames"][:3, :1]  # three static clips keep their first tubelet
  single, m1, _, _ = one_step(sharding.make_mesh(devices=jax.devices()[:1]), config, batch)
  sharded, m8, shardings, step = one_step(sharding.make_mesh(data=4, fsdp=2), config, batch)
  assert any("fsdp" in str(s.spec) for s in jax.tree_util.tree_leaves(shardings["params"]))
  (plan,) = step.plans
  assert plan.groups == 8 and plan.kind == kind
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  assert m8["tokens_kept"] == m1["tokens_kept"] < 8
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         sharded["params"], single["params"])


def test_masks_before_or_after_mixing_are_both_counted_and_either_can_be_trained_on():
  """Half the clips brighten by 9 levels over the clip (> τ), half are still. Mixup pairs each
  with its opposite (the batch reversed): a mixed clip's change is λ or 1 − λ of 9 levels, so
  at least one of each pair falls below τ after mixing, while the mask from before mixing keeps
  every token either source keeps."""
  config = tiny_config.get_config("unused")
  rng = np.random.default_rng(4)
  base = rng.integers(60, 180, (8, 1, 32, 32, 3))
  ramp = np.arange(4)[None, :, None, None, None] * 3 * (np.arange(8) >= 4)[:, None, None, None,
                                                                           None]
  batch = {"frames": (base + ramp).astype(np.uint8),
           "label": rng.integers(0, 8, 8).astype(np.int32), "valid": np.ones(8, bool)}
  mixup_only = augment.Augment(num_classes=8, cutmix_alpha=0.0, erase_prob=0.0)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  results = {flag: one_step(mesh, config, batch, flag, mixup_only)[1] for flag in (0, 1)}
  for flag, m in results.items():  # the step trains on the rule it was given …
    rule = "before" if flag else "after"
    assert m["tokens_kept"] == m[f"tokens_kept_mask_{rule}_mix"]
  for key in ("tokens_kept_mask_before_mix", "tokens_kept_mask_after_mix"):  # … reports both
    assert results[0][key] == results[1][key]
  assert results[0]["tokens_kept_mask_before_mix"] == 8  # every source is kept somewhere
  assert results[0]["tokens_kept_mask_after_mix"] < 8  # mixing dampened some changes below τ


def test_the_stream_layout_trains_exactly_like_padded_rows():
  """Same loss and gradients: the layout changes where tokens sit, never what they compute."""
  config = tiny_config.get_config("unused")
  rng = np.random.default_rng(1)
  batch = {"frames": rng.integers(0, 255, (8, 4, 32, 32, 3), np.uint8),
           "label": rng.integers(0, 8, 8).astype(np.int32), "valid": np.ones(8, bool)}
  batch["frames"][:4, :, 16:] = batch["frames"][:4, :1, 16:]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  results = {}
  for kind in ("stream", "padded"):
    config.layout.kind = kind
    results[kind] = one_step(mesh, config, batch)[:2]
  np.testing.assert_allclose(results["stream"][1]["loss"], results["padded"][1]["loss"],
                             rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         results["stream"][0]["params"], results["padded"][0]["params"])
  assert results["stream"][1]["slots"] <= results["padded"][1]["slots"]


def test_a_fixed_capacity_that_a_clip_overflows_stops_training_before_the_step():
  config = tiny_config.get_config("unused")
  config.layout.update(kind="padded", capacity=2)
  batch = {"frames": np.random.default_rng(0).integers(0, 255, (8, 4, 32, 32, 3), np.uint8),
           "label": np.zeros(8, np.int32), "valid": np.ones(8, bool)}
  with pytest.raises(OverflowError, match="more than layout.capacity=2"):
    one_step(sharding.make_mesh(devices=jax.devices()[:1]), config, batch)


def test_labels_outside_the_classes_are_weighted_out_and_counted():
  check = input_pipeline.BatchCheck(num_classes=8, max_bad_fraction=0.5, strict=False)
  batch = {"label": np.array([0, 99, -5, 7], np.int32), "valid": np.ones(4, bool),
           "error": np.zeros(4, bool)}
  out = check(batch)
  np.testing.assert_array_equal(out["valid"], [True, False, False, True])
  assert check.totals() == {"bad_records": 0, "bad_labels": 2}
  with pytest.raises(input_pipeline.DataError, match=r"outside \[0, 8\)"):
    input_pipeline.BatchCheck(num_classes=8, max_bad_fraction=0.5, strict=True)(batch)


def test_a_dataset_of_bad_records_stops_the_run():
  check = input_pipeline.BatchCheck(num_classes=8, max_bad_fraction=0.05, strict=False)
  batch = {"label": np.full(4, -1, np.int32), "valid": np.zeros(4, bool),
           "error": np.ones(4, bool)}
  with pytest.raises(input_pipeline.DataError, match="unreadable or mislabelled"):
    for _ in range(4):
      check(batch)


def test_fsdp_splits_big_arrays_along_a_divisible_dimension():
  assert sharding.param_spec((1024, 4096), 8) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.param_spec((1024,), 8) == jax.sharding.PartitionSpec()
  assert sharding.param_spec((1000, 333), 8, min_size=1) == jax.sharding.PartitionSpec("fsdp",
                                                                                       None)
  with pytest.raises(ValueError, match="needs 6 devices; there are 8"):
    sharding.make_mesh(data=3, fsdp=2)


# ------------------------------------------------------------------ bad configs


@pytest.mark.parametrize("change,message", [
    (lambda c: c.model.update(variant="B/17"), r"config.model: model.variant='B/17'"),
    (lambda c: setattr(c, "batch_size", 12), r"config.batch_size=12 is not divisible by the 8"),
    (lambda c: setattr(c, "batch_size", 0), r"config.batch_size=0: expected a positive"),
    (lambda c: setattr(c, "eval_batch_size", 0), r"config.eval_batch_size=0: expected"),
    (lambda c: setattr(c, "grad_accum_steps", 0), r"config.grad_accum_steps=0: expected"),
    (lambda c: c.data.update(train="/nowhere/train-*"), r"config.data.train: .*build_tfrecords"),
    (lambda c: c.rlt.update(policy="sometimes"), r"config.rlt: .*policy='sometimes'"),
    (lambda c: c.rlt.update(threshold=float("nan")), r"config.rlt: .*threshold=nan"),
    (lambda c: c.layout.update(kind="packed"), r"config.layout: .*kind='packed'"),
    (lambda c: c.layout.update(shapes=-1), r"config.layout.shapes=-1: expected an integer ≥ 0"),
    (lambda c: c.optim.update(lr=float("nan")), r"config.optim.lr=nan: expected a finite"),
    (lambda c: c.rlt.update(reference="first"), r"config.rlt: rlt.reference='first'"),
    (lambda c: c.rlt.update(mask_before_mix=True, max_tokens=4),
     r"config.rlt.mask_before_mix=True with config.rlt.max_tokens"),
    (lambda c: c.optim.update(lr=0.0), r"config.optim.lr=0.0: expected > 0"),
    (lambda c: c.augment.update(mixup_alpha=float("inf")), r"config.augment.mixup_alpha=inf"),
    (lambda c: c.data.update(stride=0), r"config.data.stride=0: expected a positive number"),
    (lambda c: c.data.update(stride=-2), r"config.data.stride=-2: expected a positive number"),
    (lambda c: c.update(total_steps=None, num_epochs=0.0), r"config.num_epochs=0.0: expected"),
    (lambda c: c.update(total_steps=None, num_epochs=-1.0), r"config.num_epochs=-1.0"),
    (lambda c: c.model.update(num_classes=100), r"classes.txt lists 8 classes but the model "
     r"has 100"),
    (lambda c: c.update(batch_size=64), r"config.batch_size=64: the training data .* holds 48 "
     r"videos, fewer than one batch"),
    (lambda c: c.layout.update(calibration_batches=0), r"config.layout.calibration_batches=0"),
    (lambda c: c.data.update(val_views="1x0"), r"val_views='1x0'"),
    (lambda c: c.mesh.update(fsdp=3), r"config.mesh: .*not divisible by 3"),
    (lambda c: c.update(mode="eval"), r"needs config.init_from"),
    (lambda c: (c.model.update(scan=True), c.tome.update(r=4)), r"config.model.scan=True with "
     r"config.tome.r=4"),
    (lambda c: c.update(init_from="/nowhere"), r"not a saved rlt_jax model"),
])
def test_a_bad_config_fails_before_compiling(data_dir, change, message):
  config = tiny_config.get_config(data_dir)
  change(config)
  with pytest.raises(configure.ConfigError, match=message):
    configure.check(config)


# ------------------------------------------------------------------ runs


def test_training_resumes_after_kill_9_with_exactly_the_same_losses(data_dir, tmp_path):
  reference = run_main(data_dir, tmp_path / "reference")
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = losses(tmp_path / "reference")
  assert sorted(expected) == list(range(1, 9))
  assert "step 8/8" in reference.stdout and "Training finished" in reference.stdout
  announced = re.search(r"compiling (\d+) train shapes?", reference.stdout)
  assert announced and 1 <= int(announced.group(1)) <= 16  # chosen and compiled up front
  assert set(losses(tmp_path / "reference", "compiled_shapes").values()) == {
      int(announced.group(1))}  # and no step ever needed another

  for attempt in range(3):  # the kill must land before the run ends: retry if it came late
    workdir = tmp_path / f"killed{attempt}"
    process = subprocess.Popen(main_command(data_dir, workdir), env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").is_dir() and time.time() < deadline:
      time.sleep(0.02)
    process.kill()
    process.wait()
    if not (workdir / "model").exists():
      break
  killed_at = max(losses(workdir))
  assert killed_at < 8 and not (workdir / "model").exists()
  resumed = run_main(data_dir, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout
  got = losses(workdir)
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    assert got[step] == expected[step], (step, got[step], expected[step])
  assert (workdir / "model" / "model.json").is_file()
  assert list((workdir / "tensorboard").iterdir())
  again = run_main(data_dir, workdir)
  assert again.returncode == 0 and "finished run" in again.stdout


def test_a_run_compiles_no_more_train_shapes_than_layout_shapes(data_dir, tmp_path):
  result = run_main(data_dir, tmp_path / "run", "--config.total_steps=4",
                    "--config.layout.shapes=1", devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "compiling 1 train shape " in result.stdout  # the one that holds any batch
  assert set(losses(tmp_path / "run", "compiled_shapes").values()) == {1}


def snapshot(folder):
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
          for p in sorted(folder.rglob("*"))}


def test_damaged_checkpoints_fall_back_to_an_intact_one_or_stop_in_one_line(data_dir, tmp_path):
  workdir = tmp_path / "run"
  first = run_main(data_dir, workdir, "--config.total_steps=4")
  assert first.returncode == 0, first.stderr[-3000:]
  # 64 flipped bytes in the newest checkpoint's largest array file
  damaged = max((p for p in (workdir / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(damaged.read_bytes())
  for i in np.random.default_rng(0).choice(np.arange(len(data) // 4, 3 * len(data) // 4), 64,
                                           replace=False):
    data[i] ^= 0x5A
  damaged.write_bytes(bytes(data))
  (workdir / ".model.3f2a.tmp").mkdir()  # an export killed half-way, long ago
  resumed = run_main(data_dir, workdir, "--config.total_steps=6")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 2" in resumed.stdout
  assert "newest intact one (step 4:" in resumed.stderr  # says which and why
  assert not (workdir / ".model.3f2a.tmp").exists()

  for path in (workdir / "checkpoints").rglob("_METADATA"):  # now none restores
    path.unlink()
  before = snapshot(workdir / "checkpoints")
  stopped = run_main(data_dir, workdir, "--config.total_steps=8")
  assert stopped.returncode == 1
  assert stopped.stderr.strip().splitlines() == [stopped.stderr.strip()]  # one line
  assert stopped.stderr.startswith(f"error: no checkpoint in {workdir / 'checkpoints'} can be "
                                   "restored (step 6:")
  assert snapshot(workdir / "checkpoints") == before  # left as they were


def test_a_second_run_on_a_busy_workdir_is_refused_and_touches_nothing(data_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "log.txt").write_text("the first run's log\n")
  with files.workdir_lock(workdir):
    result = run_main(data_dir, workdir)
  assert result.returncode != 0
  assert f"workdir {workdir} is in use by pid {os.getpid()}" in result.stderr
  assert (workdir / "log.txt").read_text() == "the first run's log\n"
  assert sorted(os.listdir(workdir)) == [".lock", "log.txt"]


def test_planted_links_in_a_pre_created_workdir_are_refused_before_any_write(data_dir,
                                                                             tmp_path):
  victims = [tmp_path / "victim", tmp_path / "victim2"]
  for victim in victims:
    victim.write_text("precious")
    victim.chmod(0o600)
  workdir = tmp_path / "x"
  workdir.mkdir()
  (workdir / ".lock").symlink_to(victims[0])
  (workdir / "log.txt").symlink_to(victims[1])
  result = run_main(data_dir, workdir)
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and "is a symbolic link" in result.stderr
  assert [v.read_text() for v in victims] == ["precious", "precious"]
  assert sorted(os.listdir(workdir)) == [".lock", "log.txt"]


@pytest.mark.parametrize("workdir, change, message", [
    ("new", "--config.data.train=/nowhere/train.tfrecord-*", "config.data.train: no TFRecord"),
    ("gs://bucket/run", "--config.total_steps=2", "remote workdirs are not supported"),
])
def test_a_refused_run_leaves_nothing_behind(data_dir, tmp_path, workdir, change, message):
  result = subprocess.run(main_command(data_dir, workdir, change), env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 2 and message in result.stderr
  assert result.stderr.count("\n") == 1
  assert not os.listdir(tmp_path)  # no workdir, no log, no ./gs:/bucket/run/.lock


def test_strict_data_stops_at_a_bad_record_in_one_line(data_dir, tmp_path):
  copy = tmp_path / "data"
  shutil.copytree(data_dir, copy)
  for shard in copy.glob("train.tfrecord-*-of-*"):  # a flipped byte in every record's payload
    raw = bytearray(shard.read_bytes())
    for offset, length in tfrecord.read_index(shard):
      raw[int(offset) + length // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
  result = run_main(str(copy), tmp_path / "run", "--config.data.strict=True",
                    "--config.total_steps=2", devices=1)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
  assert "CRC mismatch" in result.stderr and "config.data.strict" in result.stderr


def test_a_run_too_short_for_the_rolling_check_still_stops_on_bad_data():
  check = input_pipeline.BatchCheck(num_classes=8, max_bad_fraction=0.05, strict=False)
  for errors in ([False] * 4 + [True] * 4, [True] * 2 + [False] * 6):  # 6 of 16 bad
    check({"label": np.zeros(8, np.int32), "valid": ~np.asarray(errors),
           "error": np.asarray(errors)})
  with pytest.raises(input_pipeline.DataError, match="6 of the 16 training records read were "
                                            "unreadable"):
    check.finish()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  workdir = tmp_path / "run"
  process = subprocess.Popen(main_command(data_dir, workdir, "--config.total_steps=100000",
                                          "--config.checkpoint_every=100000"),
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() or len(losses(workdir)) < 3:
    assert time.time() < deadline and process.poll() is None
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] >= 3 and "SIGTERM: saved step" in stdout


def test_a_non_finite_loss_stops_the_run_naming_the_step(data_dir, tmp_path):
  result = run_main(data_dir, tmp_path / "nan", "--config.optim.lr=1e38",
                    "--config.total_steps=40", "--config.checkpoint_every=1")
  assert result.returncode != 0
  assert "became non-finite at step" in result.stderr
  last = result.stderr.split("The last good checkpoint is step ")[1].split()[0]
  assert (tmp_path / "nan" / "checkpoints" / last).is_dir()


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_losses_of_one_process(data_dir, tmp_path):
  one = run_main(data_dir, tmp_path / "one", "--config.total_steps=4")
  assert one.returncode == 0, one.stderr[-3000:]
  port = free_port()
  processes = [subprocess.Popen(
      main_command(data_dir, tmp_path / "two", "--config.total_steps=4",
                   f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={i}"),
      env=env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "step 4/4" in outputs[0][0] and "step 4/4" not in outputs[1][0]  # process 0 logs
  for key in ("losses", "grad_norm", "tokens_kept"):  # all-reduces may sum in another order
    expected, got = losses(tmp_path / "one", key), losses(tmp_path / "two", key)
    for step in range(1, 5):
      np.testing.assert_allclose(got[step], expected[step], rtol=1e-4)


def test_the_demo_config_learns_the_synthetic_dataset(tmp_path):
  """configs/demo.py as users run it, shortened to 4 epochs, in its own process."""
  data = str(tmp_path / "data")
  workdir = tmp_path / "work"
  result = subprocess.run(
      [sys.executable, "-m", "rlt_jax.main", f"--config={ROOT}/configs/demo.py",
       f"--workdir={workdir}", "--config.num_epochs=4", "--config.eval_every=300",
       "--config.log_every=25",
       f"--config.data.synthetic_dir={data}", f"--config.data.train={data}/train.tfrecord-*",
       f"--config.data.val={data}/val.tfrecord-*"],
      env=env(devices=1), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_losses = [r["loss"] for r in logged if "loss" in r]
  assert train_losses[-1] < train_losses[0] - 0.1
  final = [r for r in logged if "val_1x1/top1" in r][-1]
  assert final["val_1x1/top1"] > 0.2  # chance is 1/8
  assert 0.2 < final["val_1x1/tokens_kept_mean"] / final["val_1x1/tokens_total"] < 0.8
  assert "Training finished" in result.stdout and "Predict:" in result.stdout


def test_the_summary_names_the_rule_the_step_trained_on_and_the_other_where_it_mixed():
  summary = {"tokens_kept_fraction": 0.6, "kept_fraction_mask_before_mix": 0.6,
             "kept_fraction_mask_after_mix": 0.5}
  result = {"tokens_kept_mean": 29.0, "tokens_total": 58.0}
  step = types.SimpleNamespace(aug=augment.Augment(num_classes=8), mask_before_mix=True)
  assert train._kept_shares(step, summary, result, "val") == {
      "train, mask before mixing": 0.6, "train, mask after mixing (not used)": 0.5, "val": 0.5}
  step.aug = augment.Augment(num_classes=8, mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0)
  assert train._kept_shares(step, summary, result, "val") == {"train": 0.6, "val": 0.5}
