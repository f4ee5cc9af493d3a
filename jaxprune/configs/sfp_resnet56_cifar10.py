"""SFP, CIFAR-10, ResNet-56, pruning rate 40% (keep 0.6), trained from scratch.

Paper row (SFP, IJCAI 2018; CIFAR-10 results as tabulated in FPGM, mean +- std): "ResNet-56,
40%, from scratch": baseline 93.59 +- 0.58, pruned 92.26 +- 0.31 (drop 1.33), FLOPs reduction
52.6% (SFP's formula at float keep ratio 0.6; the exact count of the compacted model is lower,
both are reported).

Recipe (methods.md section 2, `common.cifar`): 200 epochs from scratch, batch 128, SGD Nesterov
0.9, weight decay 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160; L2 criterion; every
conv pruned (stem and both convs of each block), re-selected before training and after every
epoch; residual policy 'scatter' (SFP's small model). 3 seeds (mean +- std). Also the SFP
control of the GHFP comparison on CIFAR-10 when the rate matches (ResNet-56 40%, ResNet-110
30%).
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("sfp_resnet56_cifar10", "resnet56")
    common.soft(c, "sfp", 0.4)
    common.paper(c, table="SFP", source=common.SFP_CIFAR_SOURCE,
                 row="ResNet-56, 40%, from scratch", baseline_acc=93.59, pruned_acc=92.26,
                 macs_reduction=52.6)
    return c
