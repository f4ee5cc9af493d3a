"""PFEC, CIFAR-10, ResNet-110-pruned-B: 50% / 40% / 30% of the first convs, skipping layers 36,
38, 74.

Paper row (PFEC Table 1): "ResNet-110-pruned-B": error 6.70% (accuracy 93.30) against the
baseline's 6.47% (accuracy 93.53); FLOPs pruned 38.6%, params pruned 32.4% (FLOPs = conv + FC
MACs; params without BN, see jaxprune.methods.pfec.table1_cost).

Recipe (methods.md section 1, `common.pfec`): start from the trained dense baseline
config.pretrained = experiments/runs/dense_resnet110_cifar10/seed0 (row
dense_resnet110_cifar10, seed 0; the runner trains it first when it is missing), prune one-shot
by the L1 norm of each filter (named config 'resnet110-B' of jaxprune.methods.PFEC_CONFIGS,
independent selection, kept count int(N (1 - p))), remove the filters, retrain 40 epochs at a
constant LR 0.001 (the PFEC reference: batch 64, SGD momentum 0.9 without Nesterov, wd 1e-4, the CIFAR augmentation). Residual
policy 'scatter', as the baseline (the groups of the pruned first convs are the same under both
policies). 3 seeds (the retraining varies; the pretrained model is the same).
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("pfec_resnet110_cifar10_B", "resnet110", "cifar10")
    common.pfec(c, "resnet110-B", "dense_resnet110_cifar10", epochs=40)
    common.paper(c, table="PFEC", source=common.PFEC_SOURCE, row="ResNet-110-pruned-B",
                 baseline_acc=93.53, pruned_acc=93.30, macs_reduction=38.6,
                 params_reduction=32.4, note="Table 1 errors: 6.47 -> 6.70")
    return c
