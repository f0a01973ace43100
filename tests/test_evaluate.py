"""evaluate.py: multi-view softmax averaging, regrouping by cost, and the reports."""

import json

import jax
import numpy as np
import pytest

from rlt_jax import layout, rlt
from rlt_jax.models import vit
from rlt_jax.runtime import sharding
from rlt_jax.training import evaluate, forward

SPEC = vit.ModelSpec.from_variant("tiny", num_classes=5, num_frames=4, image_size=32,
                                  patch_size=16)


def batches(num_records=6, views=2, batch_size=4, seed=0):
  """Eval batches as the pipeline yields them: (record, view) in order, padded at the end."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 255, (num_records * views, 4, 32, 32, 3), np.uint8)
  frames[::3] = frames[::3, :1]  # some static clips: RLT keeps their first tubelet only
  labels = np.repeat(np.arange(num_records) % 5, views).astype(np.int32)
  total = -(-len(frames) // batch_size) * batch_size
  pad = total - len(frames)
  data = {"frames": np.concatenate([frames, np.zeros((pad, *frames.shape[1:]), np.uint8)]),
          "label": np.concatenate([labels, np.full(pad, -1, np.int32)]),
          "index": np.concatenate([np.repeat(np.arange(num_records), views),
                                   np.full(pad, -1)]).astype(np.int32),
          "view": np.concatenate([np.tile(np.arange(views), num_records),
                                  np.zeros(pad, int)]).astype(np.int32),
          "valid": np.arange(total) < len(frames), "error": np.zeros(total, bool)}
  data["cost"] = rlt.kept_counts(data["frames"], rlt.Policy("rlt"), tubelet_size=2,
                                 patch_size=16)
  return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, total,
                                                                            batch_size)]


@pytest.fixture(scope="module")
def model_and_params():
  model = vit.build(SPEC)
  frames = np.zeros((1, 4, 32, 32, 3), np.float32)
  plan = layout.plan(np.asarray([SPEC.num_tokens]), layout.Layout("padded"),
                     num_tokens=SPEC.num_tokens, groups=1)
  tokens = layout.tokenize(frames, np.ones((1, SPEC.num_tokens), bool), plan, tubelet_size=2,
                           patch_size=16)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  # a head that makes the classes distinguishable
  params = jax.tree_util.tree_map(lambda x: x * 50 if x.ndim == 2 and x.shape[-1] == 5 else x,
                                  params)
  return model, params


def test_regrouping_keeps_every_example_and_the_batch_count():
  original = batches(num_records=10, views=3)
  regrouped = list(evaluate.regroup(original, window=4))
  assert len(regrouped) == len(original)
  key = lambda bs: sorted((int(i), int(v), bool(ok)) for b in bs
                          for i, v, ok in zip(b["index"], b["view"], b["valid"]))
  assert key(regrouped) == key(original)
  for start in range(0, len(regrouped), 4):  # within a window, batches ascend in cost
    kept = [np.where(b["valid"], b["cost"], 0) for b in regrouped[start:start + 4]]
    flat = np.concatenate(kept)
    assert (np.diff(flat) >= 0).all()


@pytest.mark.parametrize("policy", ["none", "rlt"])
def test_metrics_average_each_videos_view_softmaxes(model_and_params, policy):
  model, params = model_and_params
  mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])  # 4 groups of one clip
  evaluator = evaluate.Evaluator(model, rlt.Policy(policy), layout.Layout(), mesh)
  data = batches()
  metrics = evaluator(params, data, num_records=6, num_classes=5, sort_window=2)

  alone = forward.Forward(model, rlt.Policy(policy))
  probs = np.zeros((6, 5))
  for b in data:
    for j in np.flatnonzero(b["valid"]):
      logits = np.asarray(alone(params, b["frames"][j:j + 1])[0], np.float64)[0]
      p = np.exp(logits - logits.max())
      probs[b["index"][j]] += p / p.sum() / 2
  truth = np.arange(6) % 5
  want_top1 = float((probs.argmax(-1) == truth).mean())
  assert metrics["videos"] == 6 and metrics["views"] == 12 and metrics["errors"] == 0
  assert metrics["top1"] == pytest.approx(want_top1)
  assert metrics["tokens_total"] == 8 and metrics["compiled_shapes"] >= 1
  if policy == "rlt":
    assert metrics["tokens_kept_mean"] < 8


def test_reports_are_json_and_a_per_class_csv(tmp_path):
  metrics = {"top1": 0.5, "videos": 2, "per_class": [{"class": 0, "videos": 1, "top1": 1.0},
                                                     {"class": 1, "videos": 1, "top1": 0.0}]}
  evaluate.write_report(metrics, str(tmp_path / "val_1x1_step3.json"), ["a, b", "c"])
  assert json.loads((tmp_path / "val_1x1_step3.json").read_text()) == {"top1": 0.5, "videos": 2}
  assert (tmp_path / "val_1x1_step3_per_class.csv").read_text().splitlines() == [
      "class,name,videos,top1", '0,"a, b",1,1.0000', '1,"c",1,0.0000']
