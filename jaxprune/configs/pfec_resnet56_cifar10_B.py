"""PFEC, CIFAR-10, ResNet-56-pruned-B: 60% / 30% / 10% of the first convs in stages 1/2/3,
skipping layers 16, 18, 20, 34, 38, 54.

Paper row (PFEC Table 1): "ResNet-56-pruned-B": error 6.94% (accuracy 93.06) against the
baseline's 6.96% (accuracy 93.04); FLOPs pruned 27.6%, params pruned 13.7% (FLOPs = conv + FC
MACs; params without BN, see jaxprune.methods.pfec.table1_cost).

Recipe (methods.md section 1, `common.pfec`): start from the trained dense baseline
config.pretrained = experiments/runs/dense_resnet56_cifar10/seed0 (row dense_resnet56_cifar10,
seed 0; the runner trains it first when it is missing), prune one-shot by the L1 norm of each
filter (named config 'resnet56-B' of jaxprune.methods.PFEC_CONFIGS, independent selection, kept
count int(N (1 - p))), remove the filters, retrain 40 epochs at a constant LR 0.001 (the PFEC reference: batch 64,
SGD momentum 0.9 without Nesterov, wd 1e-4, the CIFAR augmentation). Residual policy 'scatter', as the baseline
(the groups of the pruned first convs are the same under both policies). 3 seeds (the
retraining varies; the pretrained model is the same).
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("pfec_resnet56_cifar10_B", "resnet56", "cifar10")
    common.pfec(c, "resnet56-B", "dense_resnet56_cifar10", epochs=40)
    common.paper(c, table="PFEC", source=common.PFEC_SOURCE, row="ResNet-56-pruned-B",
                 baseline_acc=93.04, pruned_acc=93.06, macs_reduction=27.6,
                 params_reduction=13.7, note="Table 1 errors: 6.96 -> 6.94")
    return c
