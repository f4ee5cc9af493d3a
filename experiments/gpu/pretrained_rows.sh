#!/usr/bin/env bash
# The rows that start from the trained CIFAR-10 ResNets (issue 12) on their FULL schedules, on
# one GPU: PFEC-A and PFEC-B (ResNet-56, 40 retraining epochs of the compact model), SFP 40%
# from the trained ResNet-56 and SFP 30% from the trained ResNet-20 (200 epochs each), with the
# records brought back as one archive.
#
# Procedure:
#   1. copy the repository, ../shared/data/cifar10 (DATA_DIR) and ../shared/data/pretrained
#      (PRETRAINED) to the GPU machine;
#   2. bash experiments/gpu/pretrained_rows.sh        (SMOKE=1: 1 epoch on 512 training and 500
#      test images per run, to check the pipeline; ROWS="pfec_A pfec_B" to run only some rows;
#      EXTRA="--config.x=..." appends overrides to every run);
#   3. copy back $OUT/records.tgz, unpack it at the repository root, then
#      `python experiments/pretrained_table.py` prints the tables for RESULTS.md.
# Runs resume from their checkpoints: rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR=${DATA_DIR:-../shared/data/cifar10}
PRETRAINED=${PRETRAINED:-../shared/data/pretrained}
OUT=${OUT:-/tmp/jaxprune-gpu-pretrained}
RUNS=${RUNS:-$OUT/runs}
mkdir -p "$OUT" "$RUNS"
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then  # SKIP_INSTALL=1: jaxprune is installed already
    python -m pip install -q -e '.[cuda]' 2>/dev/null || python -m pip install -q -e .
fi
python -c "import jax; print('devices:', jax.devices())"
# the normalisation the pretrained weights were trained with (../shared/data/pretrained/README)
norm=(--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225)
for depth in 20 56; do
    [[ -f "$RUNS/import_resnet$depth/config.json" ]] ||
        jaxprune import "resnet$depth" "$PRETRAINED/resnet$depth.npz" --workdir "$RUNS/import_resnet$depth" "${norm[@]}"
done
common=(--no-progress --config.data_dir="$DATA_DIR" --config.dtype=bfloat16 --config.steps_per_call=0
        --config.eval_batch_size=1000)
suffix=""
if [[ "${SMOKE:-0}" == 1 ]]; then
    common+=(--config.epochs=1 --config.train_subset=512 --config.test_subset=500)
    suffix="_smoke"
fi
read -r -a extra <<< "${EXTRA:-}"
common+=("${extra[@]}")
run() {  # NAME IMPORT CONFIG [overrides...]
    local name=$1 import=$2 config=$3
    shift 3
    jaxprune prune "$RUNS/$import" --config "jaxprune/configs/$config.py" \
        --workdir "$RUNS/$name$suffix" "${common[@]}" "$@" 2>&1 | tee -a "$OUT/log.txt"
}
start=$(date +%s)
read -r -a rows <<< "${ROWS:-pfec_A pfec_B sfp56 sfp20}"
for row in "${rows[@]}"; do
    case $row in
        pfec_A) run pfec_resnet56_A import_resnet56 pfec_resnet56_cifar10_A ;;
        pfec_B) run pfec_resnet56_B import_resnet56 pfec_resnet56_cifar10_B ;;
        sfp56)  run sfp_resnet56_from_trained import_resnet56 sfp_resnet56_cifar10_pretrained ;;
        sfp20)  run sfp_resnet20_from_trained_200 import_resnet20 sfp_resnet20_cifar10 ;;
        *) echo "unknown row $row (allowed: pfec_A pfec_B sfp56 sfp20)" >&2; exit 2 ;;
    esac
done
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
records=$OUT/records
python experiments/pretrained_table.py --collect "$RUNS" --records "$records" > "$OUT/tables.md"
tar czf "$OUT/records.tgz" -C "$OUT" records tables.md log.txt
echo "records: $OUT/records.tgz (unpack the records/ folder into experiments/pretrained_records/)"
