"""SFP control of the GHFP comparison: CIFAR-100, ResNet-110, pruning rate 30%, from scratch.

Paper row: "SFP control, CIFAR-100, ResNet-110, 30%" (control of ghfp_resnet110_cifar100). SFP
published no CIFAR-100 figures: none (-1); the SFP formula's FLOPs reduction (conv MACs, float
keep ratio) is the same as on CIFAR-10.

Recipe (methods.md section 2, `common.cifar`): 200 epochs from scratch, batch 128, SGD Nesterov
0.9, weight decay 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160; L2 criterion; every
conv pruned (stem and both convs of each block), re-selected before training and after every
epoch; residual policy 'scatter' (SFP's small model). CIFAR-100 normalisation mean (129.3,
124.1, 112.4)/255, std (68.2, 65.4, 70.4)/255. 3 seeds. (On CIFAR-10 the control is the SFP row
sfp_resnet110_cifar10 itself, which has exactly this recipe.)
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("sfp_resnet110_cifar100", "resnet110", "cifar100")
    common.soft(c, "sfp", 0.3)
    common.paper(c, table="GHFP",
                 source="SFP (He et al., IJCAI 2018), control of " + common.GHFP_SOURCE,
                 row="SFP control, CIFAR-100, ResNet-110, 30%",
                 note="control of ghfp_resnet110_cifar100; no published CIFAR-100 figures")
    return c
