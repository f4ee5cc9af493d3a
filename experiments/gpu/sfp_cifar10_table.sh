#!/usr/bin/env bash
# The SFP CIFAR-10 table (dense and SFP; ResNet-20/32/56/110; the paper's 200-epoch recipe) on
# one GPU, with the records brought back as one archive.
#
# Procedure (see experiments/README.md, "On a GPU"):
#   1. copy the repository and the CIFAR-10 .npz shards to the GPU machine (DATA_DIR below);
#   2. bash experiments/gpu/sfp_cifar10_table.sh   (SMOKE=1: the 2-epoch --tiny schedule; ROWS="..."
#      to run other rows);
#   3. copy back $OUT/records.tgz and unpack it at the repository root, then `jaxprune report`.
# Runs resume from their checkpoints: rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR=${DATA_DIR:-../shared/data/cifar10}
OUT=${OUT:-/tmp/jaxprune-gpu}
RUNS=${RUNS:-$OUT/runs}
mkdir -p "$OUT"
python -m pip install -q -e '.[cuda]' 2>/dev/null || python -m pip install -q -e .
python -c "import jax; print('devices:', jax.devices())"
schedule=()
records=experiments/results
if [[ "${SMOKE:-0}" == 1 ]]; then schedule=(--tiny); records=experiments/results-tiny; fi
start=$(date +%s)
read -r -a rows <<< "${ROWS:-dense_resnet20_cifar10 dense_resnet32_cifar10 dense_resnet56_cifar10 dense_resnet110_cifar10 sfp_resnet20_cifar10 sfp_resnet32_cifar10 sfp_resnet56_cifar10 sfp_resnet110_cifar10}"
python experiments/run.py "${rows[@]}" --seeds 1 "${schedule[@]}" \
    --runs-dir "$RUNS" --records "$records" \
    --config.data_dir="$DATA_DIR" --config.dtype=bfloat16 --config.steps_per_call=0 \
    --config.eval_batch_size=1000 2>&1 | tee "$OUT/log.txt"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
tar czf "$OUT/records.tgz" "$records" -C "$OUT" log.txt
echo "records: $OUT/records.tgz"
