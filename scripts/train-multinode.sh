#!/usr/bin/env bash
# Train data-parallel on several machines through torchrun's c10d rendezvous.
#
# Run the same command on every machine:
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0.example:29400 RDZV_ID=run42 \
#       scripts/train-multinode.sh CONFIG [codeling train options...]
#
#   NNODES         number of machines (required)
#   RDZV_ENDPOINT  host:port of the rendezvous, reachable from every machine (required);
#                  one machine's address is enough, torchrun hosts the store there
#   RDZV_ID        job id shared by all machines of this run (default: codeling)
#   NPROC          processes (GPUs) per machine (default: 8)
#
# Requirements: run_dir must be on a file system that every machine shares, because rank 0
# writes the tokenizer, data shards and checkpoints there and the other ranks read them.
# The global batch is train.batch_size * NNODES * NPROC * train.grad_accum sequences.
# When NCCL picks the wrong network interface, set NCCL_SOCKET_IFNAME.
set -euo pipefail

if [[ $# -lt 1 || -z "${NNODES:-}" || -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "usage: NNODES=N RDZV_ENDPOINT=HOST:PORT [RDZV_ID=ID] [NPROC=8] $0 CONFIG [options...]" >&2
    exit 2
fi
config=$1
shift

exec torchrun --nnodes "$NNODES" --nproc_per_node "${NPROC:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-codeling}" \
    -m codeling train --config "$config" "$@"
