#!/usr/bin/env bash
# Here, after a GPU window: places the returned records into the repository's records folders,
# keeps the checkpoints for the next window in .stage/resume/ and prints the tables.
#   bash experiments/gpu/unpack.sh FILES_DIR [--repo DIR]
cd "$(dirname "$0")/../.." || exit 2
exec python3 experiments/gpu/unpack.py "$@"
