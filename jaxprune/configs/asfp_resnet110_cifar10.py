"""ASFP control of the GHFP comparison: CIFAR-10, ResNet-110, pruning rate 30%, from scratch.

Paper row: "ASFP control, CIFAR-10, ResNet-110, 30%" (control of ghfp_resnet110_cifar10).
ASFP's own paper was not available (methods.md section 3): no published figures (-1).

Recipe: the soft part of ghfp_resnet110_cifar10 alone, on the same recipe (the GHFP first
author's code: LR 0.1 from the first epoch, Cutout; `common.asfp_control`): ASFP with the cubic
rate P_t = P (1 - (1 - t/T)^3) (full P from 0.95 T), L2, every conv, residual 'scatter'. 3 seeds.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("asfp_resnet110_cifar10", "resnet110", "cifar10")
    common.asfp_control(c, 0.3)
    common.paper(c, table="GHFP", source="ASFP (He et al.), control of " + common.GHFP_SOURCE,
                 row="ASFP control, CIFAR-10, ResNet-110, 30%",
                 note="control of ghfp_resnet110_cifar10; no published figures in the reference")
    return c
