"""Dense baseline: CIFAR-10, resnet32, no pruning.

Paper row: "ResNet-32 baseline (SFP table)". SFP table (FPGM): baseline 92.63 +- 0.70. Used by:
sfp_resnet32_cifar10 (baseline column).

Recipe: the SFP CIFAR recipe (methods.md section 2, `common.cifar`), no pruning: 200 epochs,
batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160. 3
seeds; seed 0 is the pretrained model of the rows that start from one.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("dense_resnet32_cifar10", "resnet32", "cifar10")
    common.dense(c)
    common.paper(c, table="Baselines", source=common.SFP_CIFAR_SOURCE,
                 row="ResNet-32 baseline (SFP table)",
                 baseline_acc=92.63, note="")
    return c
