#!/usr/bin/env bash
# CPU rehearsal of GPU windows, as the device would see them (experiments/gpu/README.md):
# a clone of this branch stands for the checkout that travels, stage.py stages it, each device
# call gets a fresh copy of its working tree plus the call's carried part and an empty $OUT, and
# runs the call's command in SMOKE mode with a bare Python 3.12 venv (only the device image's
# packages) first on PATH; the returned files are checked against the limits and unpacked into
# the clone, whose .stage/resume/ then travels with the next window's calls.
#   VENV=/tmp/gpukit-venv bash experiments/gpu/rehearse.sh [WINDOW_BUDGET ...]   (default: 330 420)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-/tmp/gpukit-venv}
R=${R:-/tmp/gpukit-rehearsal}
DATA=${DATA:-$(cd "$SRC/.." && pwd)/shared/data}
[[ -d $DATA/cifar10 ]] || DATA=/work/shared/data
budgets=("$@"); [[ ${#budgets[@]} -gt 0 ]] || budgets=(330 420)
[[ -x $VENV/bin/python3 ]] || { echo "no venv at $VENV (see experiments/gpu/README.md)"; exit 2; }
rm -rf "$R"; mkdir -p "$R/userhome"
git clone -q "$SRC" "$R/repo"
if [[ -d $SRC/.stage/cache ]]; then  # the encoded data of an earlier stage.py run: no re-encoding
    mkdir -p "$R/repo/.stage"; cp -al "$SRC/.stage/cache" "$R/repo/.stage/cache"
fi
t_all=$(date +%s)
w=0
for budget in "${budgets[@]}"; do
    w=$((w + 1))
    echo "=== window $w (TIME_BUDGET=$budget): a fresh machine"
    (cd "$R/repo" && python3 experiments/gpu/stage.py --data "$DATA/cifar10" --pretrained "$DATA/pretrained" \
        --budget "$budget" | sed -n '/^p[0-9]*:/p;/^stage /p')
    rm -rf "$R/device" "$R/kit-home"
    ncalls=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$R/repo/.stage/calls.json")
    for k in $(seq 1 "$ncalls"); do
        read -r carry cmd < <(python3 -c "import json,sys; c=json.load(open(sys.argv[1]))[int(sys.argv[2])-1]; print(' '.join(c['carry']), c['command'])" "$R/repo/.stage/calls.json" "$k")
        # the working tree that travels (tracked + untracked-not-ignored) plus the carried part
        mkdir -p "$R/device"
        (cd "$R/repo" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$R/device")
        mkdir -p "$R/device/$(dirname "$carry")"; rm -rf "${R:?}/device/$carry"; cp -a "$R/repo/$carry" "$R/device/$carry"
        size=$( (cd "$R/repo" && { git ls-files -z -co --exclude-standard; find "$carry" -type f -print0; } \
            | xargs -0 stat -c %s) | awk '{s += $1} END {print s}')
        echo "--- call $k: carry $carry, tree + carry $(awk -v s="$size" 'BEGIN {printf "%.1f", s / 1048576}') MiB (limit 64), command: $cmd"
        out="$R/w$w/out$k"; mkdir -p "$out"
        t=$(date +%s)
        (cd "$R/device" && env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$R/userhome" OUT="$out" \
            KIT_HOME="$R/kit-home" SMOKE=1 SMOKE_EPOCHS="${SMOKE_EPOCHS:-40}" KIT_JOBS="${KIT_JOBS:-}" KIT_BENCH="${KIT_BENCH:-}" \
            nice -n 10 timeout 600 bash -c "$cmd" > "$R/w$w/call$k.stdout" 2>&1) || echo "call $k: exit $?"
        echo "--- call $k: $(( $(date +%s) - t )) s; returned: $(cd "$out" && ls -l | awk 'NR>1{printf "%s (%d B) ", $9, $5}')"
        python3 -c "import sys; sys.path.insert(0, sys.argv[1]); import kit; p = kit.check_out(__import__('pathlib').Path(sys.argv[2])); print('limits:', 'ok' if not p else p)" \
            "$R/repo/experiments/gpu" "$out"
    done
    python3 "$R/repo/experiments/gpu/unpack.py" "$out" --repo "$R/repo" --allow-smoke
done
echo "=== rehearsal wall time: $(( $(date +%s) - t_all )) s"
