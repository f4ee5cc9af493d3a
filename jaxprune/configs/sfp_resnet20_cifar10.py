"""SFP, CIFAR-10, ResNet-20, pruning rate 30% (keep 0.7), trained from scratch.

Paper row (SFP, IJCAI 2018; CIFAR-10 results as tabulated in FPGM, mean +- std): "ResNet-20,
30%, from scratch": baseline 92.20 +- 0.18, pruned 90.83 +- 0.31 (drop 1.37), FLOPs reduction
42.2% (SFP's formula at float keep ratio 0.7; the exact count of the compacted model is lower,
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
    c = common.cifar("sfp_resnet20_cifar10", "resnet20")
    common.soft(c, "sfp", 0.3)
    common.paper(c, table="SFP", source=common.SFP_CIFAR_SOURCE,
                 row="ResNet-20, 30%, from scratch", baseline_acc=92.20, pruned_acc=90.83,
                 macs_reduction=42.2)
    return c
