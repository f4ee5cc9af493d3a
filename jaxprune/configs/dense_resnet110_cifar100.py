"""Dense baseline: CIFAR-100, resnet110, no pruning.

Paper row: "ResNet-110 baseline, CIFAR-100 (GHFP comparison)". No published figure in the
reference (GHFP's tables were not available): the dense reference point of the GHFP / SFP /
ASFP comparison on CIFAR-100. Used by: ghfp_resnet110_cifar100, sfp_resnet110_cifar100,
asfp_resnet110_cifar100.

Recipe: the SFP CIFAR recipe (methods.md section 2, `common.cifar`), no pruning: 200 epochs,
batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160. 3
seeds; seed 0 is the pretrained model of the rows that start from one. CIFAR-100 normalisation
mean (129.3, 124.1, 112.4)/255, std (68.2, 65.4, 70.4)/255.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("dense_resnet110_cifar100", "resnet110", "cifar100")
    common.dense(c)
    common.paper(c, table="Baselines", source=common.GHFP_SOURCE,
                 row="ResNet-110 baseline, CIFAR-100 (GHFP comparison)",
                 baseline_acc=-1.00, note="no published figure")
    return c
