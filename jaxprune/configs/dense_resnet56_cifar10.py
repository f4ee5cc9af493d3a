"""Dense baseline: CIFAR-10, resnet56, no pruning.

Paper row: "ResNet-56 baseline (SFP table; PFEC Table 1)". SFP table (FPGM): baseline 93.59 +-
0.58. PFEC Table 1: ResNet-56 error 6.96% (accuracy 93.04), FLOPs 1.25e8, params 8.5e5. Used
by: sfp_resnet56_cifar10, sfp_resnet56_cifar10_pretrained (pretrained),
pfec_resnet56_cifar10_A/B (pretrained).

Recipe: the SFP CIFAR recipe (methods.md section 2, `common.cifar`), no pruning: 200 epochs,
batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160. 3
seeds; seed 0 is the pretrained model of the rows that start from one.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("dense_resnet56_cifar10", "resnet56", "cifar10")
    common.dense(c)
    common.paper(c, table="Baselines", source=common.SFP_CIFAR_SOURCE,
                 row="ResNet-56 baseline (SFP table; PFEC Table 1)",
                 baseline_acc=93.59, note="PFEC Table 1: error 6.96 (93.04)")
    return c
