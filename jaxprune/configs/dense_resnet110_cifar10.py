"""Dense baseline: CIFAR-10, resnet110, no pruning.

Paper row: "ResNet-110 baseline (SFP table; PFEC Table 1)". SFP table (FPGM): baseline 93.68 +-
0.32. PFEC Table 1: ResNet-110 error 6.47% (accuracy 93.53), FLOPs 2.53e8, params 1.72e6. Used
by: sfp_resnet110_cifar10, pfec_resnet110_cifar10_A/B (pretrained).

Recipe: the SFP CIFAR recipe (methods.md section 2, `common.cifar`), no pruning: 200 epochs,
batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160. 3
seeds; seed 0 is the pretrained model of the rows that start from one.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("dense_resnet110_cifar10", "resnet110", "cifar10")
    common.dense(c)
    common.paper(c, table="Baselines", source=common.SFP_CIFAR_SOURCE,
                 row="ResNet-110 baseline (SFP table; PFEC Table 1)",
                 baseline_acc=93.68, note="PFEC Table 1: error 6.47 (93.53)")
    return c
