#!/usr/bin/env bash
# Train data-parallel on the GPUs of one machine (8 by default) through torchrun.
#
# Usage: [NPROC=8] scripts/train-1node-8gpu.sh CONFIG [codeling train options...]
#   scripts/train-1node-8gpu.sh configs/runs/dense-tiny.yaml --resume
#
# Each process trains on one GPU (cuda:LOCAL_RANK) with train.batch_size samples, so the
# global batch is train.batch_size * NPROC * train.grad_accum sequences per optimizer step.
# To keep the global batch of a single-GPU config, divide train.batch_size (or
# train.grad_accum) by NPROC, for example --set train.batch_size=4.
# A resume must keep the global batch the checkpoint was saved with, so under another
# process count set train.batch_size to keep train.batch_size * NPROC the same.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: [NPROC=8] $0 CONFIG [codeling train options...]" >&2
    exit 2
fi
config=$1
shift

exec torchrun --standalone --nnodes 1 --nproc_per_node "${NPROC:-8}" \
    -m codeling train --config "$config" "$@"
