"""files.py: atomic writes, and a workdir no other user can turn against the run."""

import os
import stat

import pytest

from rlt_jax.runtime import files

NOBODY = 65534  # another user's uid


def owned_by_another_user(path):
  """chown to another user (root only; elsewhere the test cannot set the scene)."""
  if os.geteuid() != 0:
    pytest.skip("making a file another user's needs root")
  os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def test_a_fresh_workdir_is_created(tmp_path):
  path = files.prepare_workdir(tmp_path / "a" / "run")
  assert path.is_dir() and path == (tmp_path / "a" / "run").absolute()


def test_a_remote_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(files.UnsafeWorkdir, match="remote workdirs are not supported.*gcsfuse"):
    files.prepare_workdir("gs://bucket/run")
  assert not os.listdir(tmp_path)  # no local ./gs:/bucket/run


@pytest.mark.parametrize("name", [".lock", "log.txt", "metrics.jsonl", "log.process1.txt",
                                  "checkpoints", "tensorboard"])
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path, name, victim):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / name).symlink_to(victim)
  with pytest.raises(files.UnsafeWorkdir, match=f"{name} is a symbolic link"):
    files.prepare_workdir(workdir)
  assert victim.read_text() == "precious"


def test_files_are_never_opened_through_a_link(tmp_path, victim):
  (tmp_path / "log.txt").symlink_to(victim)
  with pytest.raises(files.UnsafeWorkdir, match="is a symbolic link"):
    files.open_append(tmp_path / "log.txt")
  (tmp_path / ".lock").symlink_to(victim)
  with pytest.raises(files.UnsafeWorkdir, match="is a symbolic link"):
    with files.workdir_lock(tmp_path):
      pass
  assert victim.read_text() == "precious"


def test_a_workdir_of_another_user_is_refused(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  owned_by_another_user(workdir)
  with pytest.raises(files.UnsafeWorkdir, match=r"belongs to .*uid 65534.*not to you"):
    files.prepare_workdir(workdir)


def test_a_link_to_another_users_folder_is_refused(tmp_path):
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  owned_by_another_user(theirs)
  (tmp_path / "run").symlink_to(theirs)
  with pytest.raises(files.UnsafeWorkdir, match="the directory its link points to"):
    files.prepare_workdir(tmp_path / "run")


def test_an_entry_of_another_user_is_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("")
  owned_by_another_user(tmp_path / "metrics.jsonl")
  with pytest.raises(files.UnsafeWorkdir, match="metrics.jsonl belongs to"):
    files.prepare_workdir(tmp_path)


def test_a_workdir_anyone_may_write_to_is_refused_unless_sticky(tmp_path):
  open_to_all = tmp_path / "open"
  open_to_all.mkdir()
  open_to_all.chmod(0o777)
  with pytest.raises(files.UnsafeWorkdir, match="chmod o-w"):
    files.prepare_workdir(open_to_all)
  with pytest.raises(files.UnsafeWorkdir, match="could replace the workdir with a link"):
    files.prepare_workdir(open_to_all / "run")  # inside it: no shelter either
  open_to_all.chmod(0o777 | stat.S_ISVTX)  # like /tmp: others cannot rename our entries
  assert files.prepare_workdir(open_to_all / "run").is_dir()


def test_a_read_only_workdir_is_refused(tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root may write anywhere")
  tmp_path.chmod(0o500)
  try:
    with pytest.raises(files.UnsafeWorkdir, match="not writable by you"):
      files.prepare_workdir(tmp_path)
  finally:
    tmp_path.chmod(0o700)


def test_temporaries_of_interrupted_writers_are_removed(tmp_path):
  (tmp_path / ".model.3f2a.tmp").mkdir()
  (tmp_path / ".model.3f2a.tmp" / "params").mkdir()
  (tmp_path / ".metrics.json.x1y2.tmp").write_text("half")
  (tmp_path / ".model.9c.old").mkdir()
  (tmp_path / "model").mkdir()
  (tmp_path / ".lock").write_text("")
  removed = files.remove_stale_temporaries(tmp_path)
  assert sorted(removed) == [".metrics.json.x1y2.tmp", ".model.3f2a.tmp", ".model.9c.old"]
  assert sorted(os.listdir(tmp_path)) == [".lock", "model"]


def test_atomic_write_replaces_a_planted_link_instead_of_writing_through_it(tmp_path, victim):
  (tmp_path / "report.json").symlink_to(victim)
  with files.atomic_write(tmp_path / "report.json") as f:
    f.write("{}")
  assert victim.read_text() == "precious"
  assert not (tmp_path / "report.json").is_symlink()
  assert (tmp_path / "report.json").read_text() == "{}"
