"""Evaluation: logits for every view, softmax averaged per video, top-1/top-5, per-class accuracy,
tokens kept, clips/s.

Views run through `forward.Forward`: each batch at static shapes planned from its exact kept
counts, so no clip is cut and each clip's logits are those of its kept tokens alone. Within a
window of batches, views are regrouped by their host-side kept counts first, so that clips of
one batch cost about the same (results are keyed by record, so order does not matter).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Iterable

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from rlt_jax import layout, rlt
from rlt_jax.checkpoints import checkpoint
from rlt_jax.data import input_pipeline
from rlt_jax.models import vit
from rlt_jax.runtime import console, files, sharding
from rlt_jax.training import configure, forward


def regroup(batches: Iterable[dict[str, np.ndarray]], window: int
            ) -> Iterable[dict[str, np.ndarray]]:
  """The same examples in the same number of batches, sorted by "cost" within each window."""
  it = iter(batches)
  while chunk := list(itertools.islice(it, max(window, 1))):
    if window <= 1 or "cost" not in chunk[0]:
      yield from chunk
      continue
    merged = {k: np.concatenate([b[k] for b in chunk]) for k in chunk[0]}
    order = input_pipeline.order_by_cost(np.where(merged["valid"], merged["cost"], 0))
    size = len(chunk[0]["valid"])
    for i in range(len(chunk)):
      yield {k: v[order[i * size:(i + 1) * size]] for k, v in merged.items()}


class Evaluator:
  """Runs a model over evaluation batches on a mesh; one compilation per layout plan."""

  def __init__(self, model: vit.VisionTransformer, policy: rlt.Policy,
               token_layout: layout.Layout, mesh: jax.sharding.Mesh):
    self.model, self.mesh = model, mesh
    self.forward = forward.Forward(model, policy, token_layout, mesh)

  def __call__(self, params: Any, batches, *, num_records: int, num_classes: int,
               description: str = "eval", sort_window: int = 16) -> dict[str, Any]:
    """Metrics over every valid view; softmax averaged over each record's views."""
    probs = np.zeros((num_records, num_classes), np.float64)
    views = np.zeros(num_records, np.int64)
    labels = np.full(num_records, -1, np.int64)
    kept, errors, start = [], 0, time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm.tqdm(desc=description, unit="batch", total=total, leave=False,
                    disable=jax.process_index() != 0 or None)
    global_batches = (sharding.global_batch(self.mesh, local)
                      for local in regroup(batches, sort_window))
    for batch, logits, counts, _ in self.forward.map(params, global_batches):
      out = jax.device_get({"logits": logits, **{k: _replicated(batch[k]) for k in
                                                  ("label", "index", "valid", "error")}})
      valid = out["valid"].astype(bool) & (out["label"] >= 0) & (out["label"] < num_classes)
      errors += int(out["error"].sum())
      logits = out["logits"][valid].astype(np.float64)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      np.add.at(probs, out["index"][valid], p / p.sum(-1, keepdims=True))
      np.add.at(views, out["index"][valid], 1)
      labels[out["index"][valid]] = out["label"][valid]
      kept += counts[valid].tolist()
      bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    seen = views > 0
    ranked = np.argsort(-probs[seen], axis=-1)
    truth = labels[seen]
    top1 = ranked[:, 0] == truth
    top5 = (ranked[:, :5] == truth[:, None]).any(-1)
    kept = np.asarray(kept, np.float64)
    per_class = [{"class": c, "videos": int((truth == c).sum()),
                  "top1": float(top1[truth == c].mean()) if (truth == c).any() else None}
                 for c in range(num_classes)]
    return {
        "videos": int(seen.sum()), "views": int(views.sum()), "errors": errors,
        "top1": float(top1.mean()) if len(truth) else float("nan"),
        "top5": float(top5.mean()) if len(truth) else float("nan"),
        "tokens_kept_mean": float(kept.mean()) if len(kept) else float("nan"),
        "tokens_kept_p10_p50_p90": [float(np.percentile(kept, q)) for q in (10, 50, 90)]
        if len(kept) else [],
        "tokens_total": self.model.spec.num_tokens,
        "compiled_shapes": len(self.forward.plans),
        "clips_per_s": float(views.sum() / seconds) if seconds else float("nan"),
        "per_class": per_class,
    }


def write_report(metrics: dict[str, Any], path: str, class_names: list[str]) -> None:
  """JSON of the metrics and a per-class CSV beside it (written by process 0, atomically)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  summary = {k: v for k, v in metrics.items() if k != "per_class"}
  files.write_json(path, summary)
  csv_path = os.path.splitext(path)[0] + "_per_class.csv"
  with files.atomic_write(csv_path) as f:
    f.write("class,name,videos,top1\n")
    for row in metrics["per_class"]:
      name = class_names[row["class"]] if row["class"] < len(class_names) else ""
      top1 = "" if row["top1"] is None else f"{row['top1']:.4f}"
      f.write(f"{row['class']},\"{name}\",{row['videos']},{top1}\n")


def make_batches(patterns: str, sampling: input_pipeline.Sampling, batch_size: int,
                 workers: int = 0, strict: bool = False, prefetch: int = 2,
                 cost: input_pipeline.Cost | None = None):
  """This process's eval batches (each example with its `cost`, for regrouping)."""
  return input_pipeline.make_dataset(
      patterns, mode="eval", sampling=sampling, batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), workers=workers,
      strict=strict, prefetch=prefetch, cost=cost)


def _replicated(x: jax.Array) -> jax.Array:
  """A batch-sharded global array gathered to every process (small per-clip fields only)."""
  if jax.process_count() == 1:
    return x
  return multihost_utils.process_allgather(x, tiled=True)


def split(config: ml_collections.ConfigDict, evaluator: Evaluator, spec: vit.ModelSpec,
          params: Any, name: str, step: int, log: console.MetricsLog, workdir: str,
          bar: Any = None) -> dict[str, Any]:
  """Evaluates data.<name> ('val' or 'final') with its views; writes the report, logs the
  metrics and prints one line."""
  split = name
  views = config.data.val_views if split == "val" else config.data.final_views
  batches = make_batches(config.data[split], configure.sampling(config, spec, views),
                         config.eval_batch_size // jax.process_count(),
                         workers=config.data.workers, strict=config.data.strict,
                         prefetch=config.data.prefetch,
                         # a host mask per view, only where `regroup` sorts by it
                         cost=configure.clip_cost(config, spec) if config.data.sort_window > 1
                         else None)
  num_records = input_pipeline.num_examples(config.data[split])
  metrics = evaluator(params, batches, num_records=num_records, num_classes=spec.num_classes,
                      description=f"{split} {views} @ {step}",
                      sort_window=config.data.sort_window)
  name = f"{split}_{views}_step{step}"
  write_report(metrics, os.path.join(workdir, f"{name}.json"),
                        input_pipeline.read_classes(config.data[split]))
  log.write(step, {f"{split}_{views}/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float))})
  line = (f"{split} ({views} views) @ step {step}: top-1 {metrics['top1']:.2%}, top-5 "
          f"{metrics['top5']:.2%} over {metrics['videos']} videos ({metrics['views']} views); "
          f"tokens kept {metrics['tokens_kept_mean']:.0f}/{metrics['tokens_total']}; "
          f"{metrics['clips_per_s']:.1f} clips/s")
  (bar.write if bar is not None else console.say)(line)
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
        spec: vit.ModelSpec) -> dict[str, Any]:
  """Evaluate `init_from` on data.final (else data.val) under the config's token policy
  (config.mode='eval', in a checked, locked workdir)."""
  model = configure.build_model(config, spec, train=False)
  _, params = checkpoint.load_model(config.init_from)
  params = vit.arrange_blocks(params, configure.scans(config))
  abstract = jax.eval_shape(  # the model the config builds (blocks arranged as it runs them)
      lambda: model.init(jax.random.PRNGKey(0), vit.example_tokens(spec))["params"])
  checkpoint.check_params(params, abstract, config.init_from)
  params = jax.device_put(params, sharding.tree_shardings(mesh, abstract))
  split_name = "final" if config.data.final else "val"
  log = console.MetricsLog(workdir)
  evaluator = Evaluator(model, configure.token_policy(config), configure.token_layout(config),
                        mesh)
  try:
    return split(config, evaluator, spec, params, split_name, 0, log, workdir)
  finally:
    log.close()
