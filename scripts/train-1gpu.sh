#!/usr/bin/env bash
# Train on one GPU (or the CPU when there is none) through torchrun.
#
# Usage: scripts/train-1gpu.sh CONFIG [codeling train options...]
#   scripts/train-1gpu.sh configs/runs/dense-tiny.yaml --set train.max_steps=200
#
# With one process this trains the same as `codeling train --config CONFIG`. It goes through
# torchrun so that the recipes for more GPUs differ only in their torchrun options.
# --standalone runs the rendezvous on this machine at a free port.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [codeling train options...]" >&2
    exit 2
fi
config=$1
shift

exec torchrun --standalone --nnodes 1 --nproc_per_node 1 \
    -m codeling train --config "$config" "$@"
