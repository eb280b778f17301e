#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher (run it once, on the first host of the hostfile; it starts every
# rank over ssh). Each host needs the same repository path and .venv, and RUN_DIR on a shared filesystem.
#
#   HOSTFILE=tools/launch/hostfile RUN_DIR=/shared/runs/duogen_sft \
#       tools/launch/deepspeed_multinode.sh experiment=duogen_cosmos25_7b data.path=/shared/data/sft.jsonl
#   DRY_RUN=1 ... prints the command instead of running it.
#
# Plan the memory first: python tools/plan.py experiment=... nodes=<hosts> gpus_per_node=<slots>
set -euo pipefail
cd "$(dirname "$0")/../.."
HOSTFILE=${HOSTFILE:-tools/launch/hostfile}
RUN_DIR=${RUN_DIR:?set RUN_DIR to the run folder on the shared filesystem (every rank writes there)}
MASTER_PORT=${MASTER_PORT:-29500}
[[ -f "$HOSTFILE" ]] || { echo "error: hostfile $HOSTFILE not found (start from tools/launch/hostfile.example)" >&2; exit 2; }
cmd=(.venv/bin/deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --no_local_rank
     tools/train.py "hydra.run.dir=$RUN_DIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
