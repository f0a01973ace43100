"""Evaluation: logits for every view, softmax averaged per video, top-1/top-5, per-class accuracy,
tokens kept, clips/s.

With policy `rlt`, each batch runs at the smallest 128-token capacity that holds every clip
(kept counts computed on the host, agreed across processes), so no clip overflows and each
clip's logits are those of its kept tokens alone; at most one compilation per bucket.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from rlt_jax import input_pipeline, rlt, sharding
from rlt_jax.models import vit


class Evaluator:
  """Runs a model over val/test batches on a mesh; one jitted forward per capacity."""

  def __init__(self, model: vit.VisionTransformer, mesh: jax.sharding.Mesh):
    self.model, self.mesh = model, mesh
    self.buckets = rlt.capacity_buckets(model.num_tokens)
    replicated = NamedSharding(mesh, P())
    self._forward = jax.jit(self._logits, static_argnums=2, out_shardings=replicated)

  def _logits(self, params, batch, capacity):
    tokenizer = dataclasses.replace(self.model.tokenizer, capacity=capacity, packing=False,
                                    row_length=None, num_rows=None, overflow="full")
    out = self.model.clone(tokenizer=tokenizer).apply({"params": params}, batch["frames"],
                                                      rngs={"tokens": jax.random.PRNGKey(0)})
    return {"logits": out.logits, "kept": out.kept, "label": batch["label"],
            "index": batch["index"], "valid": batch["valid"], "error": batch["error"]}

  def _capacity(self, local: dict[str, np.ndarray]) -> int:
    policy = self.model.tokenizer.policy
    if policy == "rlt":
      most = np.max(local["kept"], initial=0)
      most = int(np.max(multihost_utils.process_allgather(np.int32(most))))
      return rlt.choose_capacity([most], self.buckets)
    if policy == "random":
      count = rlt.random_keep_count(self.model.num_tokens, self.model.tokenizer.keep_fraction)
      return rlt.choose_capacity([count], self.buckets)
    return self.model.num_tokens

  def __call__(self, params: Any, batches, *, num_records: int, num_classes: int,
               description: str = "eval") -> dict[str, Any]:
    """Metrics over every valid view; softmax averaged over each record's views."""
    probs = np.zeros((num_records, num_classes), np.float64)
    views = np.zeros(num_records, np.int64)
    labels = np.full(num_records, -1, np.int64)
    kept, errors, start = [], 0, time.perf_counter()
    bar = tqdm.tqdm(desc=description, unit="batch", disable=jax.process_index() != 0 or None)
    for local in batches:
      out = jax.device_get(self._forward(params, sharding.global_batch(self.mesh, local),
                                         self._capacity(local)))
      valid = out["valid"].astype(bool)
      errors += int(out["error"].sum())
      logits = out["logits"][valid].astype(np.float64)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      np.add.at(probs, out["index"][valid], p / p.sum(-1, keepdims=True))
      np.add.at(views, out["index"][valid], 1)
      labels[out["index"][valid]] = out["label"][valid]
      kept += out["kept"][valid].tolist()
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
        "tokens_total": self.model.num_tokens,
        "clips_per_s": float(views.sum() / seconds) if seconds else float("nan"),
        "per_class": per_class,
    }


def write_report(metrics: dict[str, Any], path: str, class_names: list[str]) -> None:
  """JSON of the metrics and a per-class CSV beside it (written by process 0, atomically)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  summary = {k: v for k, v in metrics.items() if k != "per_class"}
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)
  csv_path = os.path.splitext(path)[0] + "_per_class.csv"
  with open(csv_path + ".tmp", "w") as f:
    f.write("class,name,videos,top1\n")
    for row in metrics["per_class"]:
      name = class_names[row["class"]] if row["class"] < len(class_names) else ""
      top1 = "" if row["top1"] is None else f"{row['top1']:.4f}"
      f.write(f"{row['class']},\"{name}\",{row['videos']},{top1}\n")
  os.replace(csv_path + ".tmp", csv_path)


def make_batches(patterns: str, mode: str, sampling: input_pipeline.Sampling, batch_size: int,
                 workers: int = 0, strict: bool = False):
  """This process's eval batches (with host kept counts for RLT bucketing)."""
  return input_pipeline.make_dataset(
      patterns, mode=mode, sampling=sampling, batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), workers=workers,
      strict=strict)
