#!/usr/bin/env bash
# Here, before a GPU window: builds .stage/ (data, wheels, weights, the last window's checkpoints
# in parts under the 64 MiB a device call carries) and prints the device calls to make.
#   bash experiments/gpu/stage.sh [--data DIR] [--pretrained DIR] [--budget SECONDS]
cd "$(dirname "$0")/../.." || exit 2
exec python3 experiments/gpu/stage.py "$@"
