"""launch/: --dry_run prints the exact commands for a 2-host example."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script, *args):
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry_run", *args],
                          capture_output=True, text=True, check=True)
  return result.stdout.splitlines()


def test_tpu_pod_slice_commands():
  lines = dry_run("tpu_pod.sh", "--name", "rlt", "--zone", "us-central2-b", "--type", "v4-16",
                  "--config", "configs/k400_vitb_rlt.py", "--workdir", "gs://bucket/run",
                  "--repo", "https://example.org/rlt_jax.git", "--spot", "--",
                  "--config.batch_size=512")
  assert lines[0] == ("gcloud compute tpus tpu-vm create rlt --zone=us-central2-b "
                      "--accelerator-type=v4-16 --version=tpu-ubuntu2204-base --spot")
  assert "--worker=all" in lines[1] and "pip\\ install\\ -e\\ ." in lines[1]
  assert "https://example.org/rlt_jax.git" in lines[1]
  assert lines[2].startswith("gcloud compute tpus tpu-vm ssh rlt --zone=us-central2-b "
                             "--worker=all --command")
  assert ("gcsfuse\\ --implicit-dirs\\ --rename-dir-limit=1000000\\ bucket\\ "
          "\\$HOME/gcs/bucket") in lines[2]  # the workdir's bucket, mounted on every worker
  assert ("python3\\ -m\\ rlt_jax.main\\ --config=configs/k400_vitb_rlt.py\\ "
          "--workdir=\\$HOME/gcs/bucket/run\\ --config.batch_size=512") in lines[3]


def test_tpu_workdir_must_be_on_gcs():
  result = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--name", "a",
                           "--zone", "z", "--type", "v4-16", "--config", "c.py", "--workdir",
                           "/local", "--repo", "r", "--dry_run"], capture_output=True, text=True)
  assert result.returncode == 2 and "--workdir must be on GCS" in result.stderr


def test_slurm_two_nodes_one_process_per_gpu():
  lines = dry_run("slurm.sh", "--nodes", "2", "--gpus_per_node", "4", "--config",
                  "configs/k400_vitb_rlt.py", "--workdir", "/shared/run", "--partition", "gpu")
  assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=4" in lines
  assert "#SBATCH --gpus-per-task=1" in lines and "#SBATCH --requeue" in lines
  assert "#SBATCH --partition=gpu" in lines
  assert lines[-1] == ("srun python3 -m rlt_jax.main --config=configs/k400_vitb_rlt.py "
                       "--workdir=/shared/run")


def test_single_node_multi_gpu():
  assert dry_run("slurm.sh", "--local", "--config", "configs/demo.py", "--workdir", "/w") == [
      "python3 -m rlt_jax.main --config=configs/demo.py --workdir=/w"]
