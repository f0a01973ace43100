#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice, install rlt_jax on every worker, run
# `python -m rlt_jax.main` on all workers at once (JAX's distributed runtime starts by itself on
# Cloud TPU), with data and workdir on GCS. The workdir's bucket is mounted with gcsfuse on every
# worker (at $HOME/gcs/BUCKET) and the run writes there: checkpoints, the lock and the logs need
# a file system, which a gs:// URL is not. With --spot, a preempted slice is recreated and the
# same command resumes from the workdir's latest checkpoint.
#
#   launch/tpu_pod.sh --name rlt-v4 --zone us-central2-b --type v4-32 --config configs/k400_vitb_rlt.py \
#       --workdir gs://BUCKET/k400_vitb_rlt [--repo GIT_URL] [--branch main] [--spot] [--dry_run] \
#       [-- --config.batch_size=512 ...]
# --repo defaults to this checkout's origin remote; every worker clones it.
set -euo pipefail

quote() {  # the arguments as one shell-quoted line
  local out="" a
  for a in "$@"; do out+="${out:+ }$(printf '%q' "$a")"; done
  echo "$out"
}

NAME="" ZONE="" TYPE="" CONFIG="" WORKDIR="" SPOT=0 DRY=0
VERSION="tpu-ubuntu2204-base" REPO="$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)" BRANCH="main"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --branch) BRANCH="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry_run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for v in NAME ZONE TYPE CONFIG WORKDIR REPO; do
  [[ -n "${!v}" ]] || { echo "error: --${v,,} is required" >&2; exit 2; }
done
[[ "$WORKDIR" == gs://* ]] || { echo "error: --workdir must be on GCS (gs://...) so every worker and a recreated slice see it" >&2; exit 2; }

run() {  # print the command; run it unless --dry_run
  quote "$@"
  if [[ $DRY -eq 0 ]]; then "$@"; fi
}

create=(gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION")
if [[ $SPOT -eq 1 ]]; then create+=(--spot); fi
BUCKET="${WORKDIR#gs://}"; BUCKET="${BUCKET%%/*}"
MOUNTED="\$HOME/gcs/$BUCKET${WORKDIR#gs://$BUCKET}"  # the workdir as every worker sees it
install="set -e; rm -rf rlt_jax; git clone --depth 1 --branch $BRANCH $REPO rlt_jax && cd rlt_jax && python3 -m pip install -e . gcsfs 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
mount="set -e; if ! command -v gcsfuse >/dev/null; then echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -; sudo apt-get update -q; sudo apt-get install -y -q gcsfuse; fi; mkdir -p \$HOME/gcs/$BUCKET; mountpoint -q \$HOME/gcs/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET \$HOME/gcs/$BUCKET"
train="cd rlt_jax && python3 -m rlt_jax.main --config=$CONFIG --workdir=$MOUNTED"
for arg in "${EXTRA[@]}"; do train+=" $(printf '%q' "$arg")"; done
ssh=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command)

attempt=0
while :; do
  attempt=$((attempt + 1))
  run "${create[@]}" || true  # an existing slice is reused
  run "${ssh[@]}" "$install"
  run "${ssh[@]}" "$mount"
  if run "${ssh[@]}" "$train"; then break; fi
  if [[ $SPOT -eq 0 || $DRY -eq 1 ]]; then
    [[ $DRY -eq 1 ]] && break
    echo "error: training failed on $NAME (not --spot, so not retrying)" >&2; exit 1
  fi
  echo "attempt $attempt ended (preempted?); recreating $NAME and resuming from $WORKDIR" >&2
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet || true
done
