#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU across NODES nodes. JAX's distributed
# runtime reads the SLURM environment (jax.distributed.initialize() auto-detects it), each
# process takes its share of the data, and a requeued job resumes from the workdir's latest
# checkpoint (SIGTERM before preemption saves one).
#
#   launch/slurm.sh --nodes 2 --gpus_per_node 8 --config configs/k400_vitb_rlt.py \
#       --workdir /shared/ckpt/k400_vitb_rlt [--partition gpu] [--time 48:00:00] [--dry_run] [-- overrides]
# One node, all its GPUs, no SLURM:
#   launch/slurm.sh --local --config configs/k400_vitb_rlt.py --workdir /ckpt/run [--dry_run]
set -euo pipefail

quote() {  # the arguments as one shell-quoted line
  local out="" a
  for a in "$@"; do out+="${out:+ }$(printf '%q' "$a")"; done
  echo "$out"
}

NODES=1 GPUS=8 CONFIG="" WORKDIR="" PARTITION="" TIME="48:00:00" DRY=0 LOCAL=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus_per_node) GPUS="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --dry_run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -n "$CONFIG" && -n "$WORKDIR" ]] || { echo "error: --config and --workdir are required" >&2; exit 2; }

train=(python3 -m rlt_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [[ $LOCAL -eq 1 ]]; then  # one process drives every local GPU
  quote "${train[@]}"
  [[ $DRY -eq 1 ]] || exec "${train[@]}"
  exit 0
fi

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=rlt_jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-task=1
#SBATCH --time=$TIME
#SBATCH --requeue
#SBATCH --signal=TERM@120
${PARTITION:+#SBATCH --partition=$PARTITION}
srun $(quote "${train[@]}")
SBATCH
)
echo "$script"
if [[ $DRY -eq 0 ]]; then
  echo "$script" | sbatch
fi
