#!/usr/bin/env bash
# Short CPU sanity runs of issue 3 (NOT paper reproductions): dense, SFP, GHFP and HFP
# ResNet-20 on CIFAR-10 at matched MACs (about 42% fewer), the same short schedule each.
# Usage: bash experiments/sanity_runs.sh [EPOCHS] [TRAIN_IMAGES]   (runs land in experiments/runs/sanity/)
set -euo pipefail
cd "$(dirname "$0")/.."
E=${1:-3}
N=${2:-10000}  # training images used (a prefix of the 50,000), for CPU-sized runs
OUT=experiments/runs/sanity
COMMON=(--config experiments/configs/sfp_resnet20_cifar10.py --no-progress
        --config.epochs=$E --config.optimizer.schedule=cosine --config.optimizer.base_lr=0.1
        --config.num_seeds=1 --config.train_subset=$N)
jaxprune train "${COMMON[@]}" --workdir $OUT/dense_resnet20 --config.name=sanity_dense \
    --config.method.name=dense --config.method.rate=0.0
# SFP / GHFP at 30% per conv (SFP formula: 42.2% fewer MACs); BN of selected filters masked
# too (mask_bn): with few epochs, stale BN statistics of zeroed filters otherwise dominate.
jaxprune train "${COMMON[@]}" --workdir $OUT/sfp_resnet20 --config.name=sanity_sfp \
    --config.method.name=sfp --config.method.rate=0.3 --config.method.kwargs.mask_bn=True
jaxprune train "${COMMON[@]}" --workdir $OUT/ghfp_resnet20 --config.name=sanity_ghfp \
    --config.method.name=ghfp --config.method.rate=0.3 --config.method.kwargs.mask_bn=True
# HFP: exact targets, 42% fewer conv+fc MACs and 42% fewer params.
jaxprune train "${COMMON[@]}" --workdir $OUT/hfp_resnet20 --config.name=sanity_hfp \
    --config.method.name=hfp --config.method.rate=0.0 \
    --config.method.kwargs.macs_reduction=0.42 --config.method.kwargs.params_reduction=0.42
