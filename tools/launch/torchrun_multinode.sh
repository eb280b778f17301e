#!/usr/bin/env bash
# Several nodes with torchrun: run the same command on every node (by hand, pdsh or Slurm); the c10d rendezvous
# at MASTER_ADDR:MASTER_PORT assigns the ranks. RUN_DIR must be on a shared filesystem.
#
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node-001 RUN_DIR=/shared/runs/duogen_align \
#       tools/launch/torchrun_multinode.sh experiment=duogen_cosmos25_7b stage=duogen_align init_from=... data.path=...
#   DRY_RUN=1 ... prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/../.."
NNODES=${NNODES:?set NNODES (number of nodes)}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first node\'s hostname}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-unifuse}
RUN_DIR=${RUN_DIR:?set RUN_DIR to the run folder on the shared filesystem (every rank writes there)}
cmd=(.venv/bin/torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d
     --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_ID" tools/train.py "hydra.run.dir=$RUN_DIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
