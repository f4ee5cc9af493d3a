#!/usr/bin/env bash
# The GPU kit's one command, the same in every device call (experiments/gpu/README.md):
#   TIME_BUDGET=540 bash experiments/gpu/kit.sh
# Receives the call's staged part; the call that completes the parts runs the benches and the rows
# within TIME_BUDGET seconds and packs what comes back into $OUT (experiments/gpu/kit.py).
export KIT_T0=${KIT_T0:-$(date +%s)}
cd "$(dirname "$0")/../.." || exit 2
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHON=${PYTHON:-python3}
exec "$PYTHON" experiments/gpu/kit.py
