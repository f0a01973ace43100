"""README.md: its Python example runs as written, and its layout section lists the real files."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_the_python_example_runs_as_written():
  section = README[README.index("## Use the model and RLT from Python"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md (Use the model and RLT from Python)", "exec"), namespace)
  assert namespace["logits"].shape == (2, 5)


def test_the_layout_section_lists_every_tracked_file_and_no_other():
  block = README[README.index("## Layout"):]
  block = re.search(r"```\n(.*?)```", block, re.S).group(1)
  listed = {line.split()[0] for line in block.splitlines() if line.strip()}
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  if not tracked:  # not a git checkout (an unpacked copy): nothing to compare with
    return
  wanted = {f for f in tracked if f.endswith((".py", ".md", ".sh", ".png"))
            and not f.startswith("tests/fixtures/") and f != "README.md"}
  wanted |= {"tests/fixtures/README.md", "tests/fixtures/videomae2_tiny.pth",
             "tests/fixtures/videomae2_tiny_expected.npz"}
  folders = {entry for entry in listed if entry.endswith("/")}
  missing = {f for f in wanted if f not in listed and not any(f.startswith(d) for d in folders)}
  assert not missing, f"README's layout does not list {sorted(missing)}"
  gone = {f for f in listed - folders if not os.path.exists(os.path.join(ROOT, f))}
  assert not gone, f"README's layout lists files that do not exist: {sorted(gone)}"
