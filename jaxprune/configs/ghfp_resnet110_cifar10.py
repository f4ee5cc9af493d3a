"""GHFP, CIFAR-10, ResNet-110, pruning rate 30% (SFP's rate for ResNet-110), from scratch.

Paper row (GHFP, Cai et al., IJCNN 2021): "GHFP, CIFAR-10, ResNet-110, 30%". Published figures:
none in the reference (paper.* accuracies -1). GHFP's own tables were not available (methods.md
section 4): the claim checked is GHFP > SFP and ASFP in accuracy at the same rate and epochs,
and faster convergence (test accuracy reached by epoch T/2, recorded by the runner). Controls
at the same rate and schedule: sfp_resnet110_cifar10 (SFP) and asfp_resnet110_cifar10 (ASFP).

Variant: the GHFP first author's public code (cailinhang/PGMPF `pruning_resnet_soft_hard.py`,
methods.md sections 4 and 7), the only evidence of what the paper's experiments ran;
`common.ghfp(c, rate, variant='reading')` gives methods.md section 4's reading instead.
Recipe: 200 epochs, batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.1 from the first epoch (no warm-up
epoch), x0.2 at 60/120/160; flip + pad + crop and Cutout 12 px (CIFAR-10); L2 criterion, every
conv pruned, residual 'scatter'. Soft part: ASFP with the cubic rate P_t = P (1 - (1 - t/T)^3)
(full P from 0.95 T); hard fraction h = 1 - (1 - (e+1)/T)^3 (every pruned filter hard at the
end); int(N P_t h) hard filters per layer; the first selection already uses the epoch-0
values. The SFP control keeps the SFP paper recipe (no Cutout, one warm-up epoch). 3 seeds.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("ghfp_resnet110_cifar10", "resnet110", "cifar10")
    common.ghfp(c, 0.3)
    common.paper(c, table="GHFP", source=common.GHFP_SOURCE, row="GHFP, CIFAR-10, ResNet-110, 30%",
                 note="no published figures in the reference",
                 controls=("sfp_resnet110_cifar10", "asfp_resnet110_cifar10"))
    return c
