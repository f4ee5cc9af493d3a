"""PFEC, CIFAR-10, VGG-16-pruned-A: conv1 and conv8..conv13 pruned by 50%.

Paper row (PFEC Table 1): "VGG-16-pruned-A": error 6.60% (accuracy 93.40) against the
baseline's 6.75% (accuracy 93.25); FLOPs pruned 34.2%, params pruned 64.0% (FLOPs = conv + FC
MACs; params without BN, see jaxprune.methods.pfec.table1_cost).

Recipe (methods.md section 1, `common.pfec`): start from the trained dense baseline
config.pretrained = experiments/runs/dense_vgg16_cifar10/seed0 (row dense_vgg16_cifar10, seed
0; the runner trains it first when it is missing), prune one-shot by the L1 norm of each filter
(named config 'vgg16-A' of jaxprune.methods.PFEC_CONFIGS, independent selection, kept count
int(N (1 - p))), remove the filters, retrain 40 epochs at a constant LR 0.001 (the PFEC reference: batch 64, SGD
momentum 0.9 without Nesterov, wd 1e-4, the CIFAR augmentation). Residual policy 'scatter', as the baseline (the
groups of the pruned first convs are the same under both policies). 3 seeds (the retraining
varies; the pretrained model is the same).
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("pfec_vgg16_cifar10_A", "vgg16", "cifar10")
    common.pfec(c, "vgg16-A", "dense_vgg16_cifar10", epochs=40)
    common.paper(c, table="PFEC", source=common.PFEC_SOURCE, row="VGG-16-pruned-A",
                 baseline_acc=93.25, pruned_acc=93.40, macs_reduction=34.2,
                 params_reduction=64.0, note="Table 1 errors: 6.75 -> 6.60")
    return c
