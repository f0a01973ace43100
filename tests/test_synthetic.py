"""synthetic.py: a per-user default folder, deterministic data, reuse only after verification."""

import json

import pytest

from rlt_jax.data import dmvr, synthetic, tfrecord

SMALL = dict(train_videos=6, val_videos=3, size=32, num_frames=6, videos_per_shard=4)


def test_the_default_folder_is_a_per_user_cache(monkeypatch, tmp_path):
  """It was /tmp/rlt_synthetic: anyone could plant shards there, and they were used as-is."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert synthetic.default_dir() == str(tmp_path / "cache" / "rlt_jax" / "demo")
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says: ignore it
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert synthetic.default_dir() == str(tmp_path / "home" / ".cache" / "rlt_jax" / "demo")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert synthetic.default_dir() == str(tmp_path / "home" / ".cache" / "rlt_jax" / "demo")


def test_generation_is_deterministic_and_says_what_it_does(tmp_path, capsys):
  (tmp_path / "a").mkdir()  # an empty folder is fine too
  synthetic.generate(str(tmp_path / "a"), **SMALL)
  assert capsys.readouterr().err == (f"generating the demo dataset (9 videos) in {tmp_path / 'a'} "
                                     "(no dataset there) ...\n")
  synthetic.generate(str(tmp_path / "b"), **SMALL)
  manifests = [json.loads((tmp_path / d / synthetic.MANIFEST).read_text()) for d in "ab"]
  assert manifests[0] == manifests[1]
  assert sorted(manifests[0]["files"]) == [
      ".rlt_index/train.tfrecord-00000-of-00002.npy",
      ".rlt_index/train.tfrecord-00001-of-00002.npy",
      ".rlt_index/val.tfrecord-00000-of-00001.npy", "classes.txt",
      "train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002",
      "val.tfrecord-00000-of-00001"]
  shards = tfrecord.list_shards(str(tmp_path / "a" / "train.tfrecord-*"))
  labels = [dmvr.parse(r).label for s in shards for r in tfrecord.read_records(s)]
  assert labels == [0, 1, 2, 3, 4, 5]


def test_an_existing_dataset_is_reused_only_if_it_matches_its_manifest(tmp_path, capsys,
                                                                         monkeypatch):
  out = tmp_path / "demo"
  synthetic.generate(str(out), **SMALL)
  manifest = (out / synthetic.MANIFEST).read_text()
  shard = out / "train.tfrecord-00001-of-00002"
  capsys.readouterr()
  real_make_video, made = synthetic.make_video, []
  monkeypatch.setattr(synthetic, "make_video", lambda *a, **k: made.append(1) or
                      real_make_video(*a, **k))
  synthetic.generate(str(out), **SMALL)
  assert not made and capsys.readouterr().err == ""

  data = bytearray(shard.read_bytes())
  data[100] ^= 1  # a planted or damaged shard, same size
  shard.write_bytes(bytes(data))
  synthetic.generate(str(out), **SMALL)
  assert "train.tfrecord-00001-of-00002 has changed" in capsys.readouterr().err
  assert (out / synthetic.MANIFEST).read_text() == manifest and len(made) == 9

  (out / "val.tfrecord-00001-of-00002").write_bytes(b"")  # a stray shard would join the glob
  synthetic.generate(str(out), **SMALL)
  assert "its files are" in capsys.readouterr().err
  assert not (out / "val.tfrecord-00001-of-00002").exists()

  synthetic.generate(str(out), **{**SMALL, "seed": 1})
  assert "generated with other parameters" in capsys.readouterr().err
  assert (out / synthetic.MANIFEST).read_text() != manifest


def test_a_folder_holding_something_else_is_never_replaced(tmp_path):
  out = tmp_path / "data"
  out.mkdir()
  (out / "train.tfrecord-00000-of-00001").write_bytes(b"someone's real shard")
  with pytest.raises(FileExistsError, match="not a synthetic dataset this generator wrote"):
    synthetic.generate(str(out), **SMALL)
  assert (out / "train.tfrecord-00000-of-00001").read_bytes() == b"someone's real shard"
  with pytest.raises(SystemExit, match=r"^error: .*data: holds train.tfrecord-00000-of-00001"):
    synthetic.main(["--output_dir", str(out), "--train_videos", "2", "--val_videos", "1"])


def test_no_write_follows_a_symlink_planted_at_a_temporary_name(tmp_path, victim):
  """The old generator wrote classes.txt through `classes.txt.tmp` in the (shared /tmp) folder."""
  out = tmp_path / "demo"
  synthetic.generate(str(out), **SMALL)
  for name in ("classes.txt.tmp", ".classes.txt.tmp", ".train.tfrecord-00000-of-00002.tmp"):
    (out / name).symlink_to(victim)
  with pytest.raises(FileExistsError):  # planted names are not the generator's
    synthetic.generate(str(out), **{**SMALL, "seed": 1})
  assert victim.read_text() == "precious"
