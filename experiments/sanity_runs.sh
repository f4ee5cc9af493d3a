#!/usr/bin/env bash
# Short CPU sanity runs of issue 3 (NOT paper reproductions): dense, SFP, GHFP and HFP
# ResNet-20 on CIFAR-10 at matched MACs (about 42% fewer), the same short schedule each.
# Usage: bash experiments/sanity_runs.sh [EPOCHS] [TRAIN_IMAGES] [RUNS]
#   RUNS: comma-separated subset of dense,sfp,ghfp,hfp,hfp_noft (default: dense,sfp,ghfp,hfp).
#   Runs land in experiments/runs/sanity/<run>; their records are copied to experiments/sanity_records/.
# To use both cores of a 2-core machine for two runs at once, pin each to one core:
#   taskset -c 0 bash experiments/sanity_runs.sh 4 20000 dense,sfp &
#   taskset -c 1 bash experiments/sanity_runs.sh 4 20000 ghfp,hfp &
set -euo pipefail
cd "$(dirname "$0")/.."
E=${1:-3}
N=${2:-10000}  # training images used (a prefix of the 50,000), for CPU-sized runs
RUNS=${3:-dense,sfp,ghfp,hfp}
OUT=experiments/runs/sanity
REC=experiments/sanity_records
COMMON=(--config jaxprune/configs/sfp_resnet20_cifar10.py --no-progress
        --config.epochs=$E --config.optimizer.schedule=cosine --config.optimizer.base_lr=0.1
        --config.num_seeds=1 --config.train_subset=$N)
run() {
  local name=$1; shift
  jaxprune train "${COMMON[@]}" --workdir $OUT/${name}_resnet20 --config.name=sanity_$name "$@"
  # keep the small records in the repository (experiments/sanity_table.py prints them)
  mkdir -p $REC/${name}_resnet20
  cp $OUT/${name}_resnet20/{config.json,metrics.jsonl,result.json} $REC/${name}_resnet20/
}
for r in ${RUNS//,/ }; do
  case $r in
    dense) run dense --config.method.name=dense --config.method.rate=0.0 ;;
    # SFP / GHFP at 30% per conv (SFP formula: 42.2% fewer MACs); BN of selected filters masked
    # too (mask_bn): with few epochs, stale BN statistics of zeroed filters otherwise dominate.
    sfp) run sfp --config.method.name=sfp --config.method.rate=0.3 --config.method.kwargs.mask_bn=True ;;
    ghfp) run ghfp --config.method.name=ghfp --config.method.rate=0.3 --config.method.kwargs.mask_bn=True ;;
    # HFP: exact targets, 42% fewer conv+fc MACs and 42% fewer params; the same number of
    # epochs in all: E-1 with the penalty, then 1 epoch of fine-tuning with the masks fixed.
    hfp) run hfp --config.method.name=hfp --config.method.rate=0.0 \
           --config.method.kwargs.macs_reduction=0.42 --config.method.kwargs.params_reduction=0.42 \
           --config.epochs=$((E - 1)) --config.finetune_epochs=1 --config.finetune_lr=0.01 ;;
    # HFP without fine-tuning (hard pruning at the end of E epochs, then compaction)
    hfp_noft) run hfp_noft --config.method.name=hfp --config.method.rate=0.0 \
           --config.method.kwargs.macs_reduction=0.42 --config.method.kwargs.params_reduction=0.42 ;;
    *) echo "unknown run '$r' (allowed: dense, sfp, ghfp, hfp, hfp_noft)" >&2; exit 2 ;;
  esac
done
