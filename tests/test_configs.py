"""configs/: every file (and every argument of the parameterised ones) passes the trainer's
checks and builds its model abstractly, so a broken config fails here, not on a pod slice."""

import glob
import importlib.util
import os

import jax
import pytest

from rlt_jax.checkpoints import checkpoint
from rlt_jax.training import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
ARGS = {"finetune.py": ["", "variant=S/16,rlt=True", "variant=L/16,dataset=ssv2,rlt=True",
                        "variant=H/16,rlt=True,stride=1,frames=32", "variant=g/14",
                        "variant=B/16,rlt=True,runlocal=True,length_embedding=True"],
        "eval.py": ["", "policy=none", "policy=random,tome=8"],
        "demo.py": ["", "rlt=False,seed=2"]}


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_file_is_covered_and_opens_with_its_command():
  assert CONFIGS
  for path in CONFIGS:
    doc = load(path).__doc__ or ""
    assert "python -m rlt_jax.main" in doc, path


@pytest.mark.parametrize("path,arg", [(p, a) for p in CONFIGS
                                      for a in ARGS.get(os.path.basename(p), [""])])
def test_config_passes_check_and_builds_its_model_abstractly(path, arg):
  config = load(path).get_config(arg or None)
  spec = configure.check(config, files_too=False)
  params = checkpoint.abstract_params(spec)
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert count > 0
  if config.model.variant == "B/16" and spec.num_classes == 400:
    assert 86e6 < count < 88e6  # ViT-B/16 with a 400-class head


def test_a_bad_config_argument_is_named():
  with pytest.raises(ValueError, match="config argument 'varaint'"):
    load(os.path.join(ROOT, "configs", "finetune.py")).get_config("varaint=B/16")
