"""Test setup: 8 fake CPU devices (so sharding is exercised), exact fp32 matmuls, vendored fixtures.

The fake devices share the machine's cores; on a busy machine one device thread can miss XLA's
default 40 s collective rendezvous and abort the whole process, so the timeout is raised here and
long multi-device runs (training, two processes, the demo) happen in subprocesses.
"""

import hashlib
import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_timeout_seconds=900"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS, on purpose)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
FIXTURE_SHA256 = {
    "videomae2_tiny.pth": "74cc7e54972ad71a1805ccc0fa9115b459c1971eaf1dc6dbc36469d06529c79f",
    "videomae2_tiny_expected.npz":
        "b647a4b123145fb2bc34ba213da3989a0c282bd0fdc944970c287d0df34dcbb7",
}


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """tests/fixtures, checked against the sums in its README: missing or altered data is an error."""
  for name, want in FIXTURE_SHA256.items():
    path = FIXTURES / name
    if not path.is_file():
      raise FileNotFoundError(f"test fixture {path} is missing (it is part of the repository)")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != want:
      raise ValueError(f"test fixture {path} has sha256 {got}, expected {want}")
  return FIXTURES


@pytest.fixture
def victim(tmp_path):
  """A file outside every folder a test writes to; planted links point at it. Its content
  must survive the test: `victim.read_text() == "precious"`."""
  path = tmp_path / "victim"
  path.write_text("precious")
  return path
