"""Dense baseline: CIFAR-10, vgg16, no pruning.

Paper row: "VGG-16 baseline (PFEC Table 1)". PFEC Table 1: VGG-16 error 6.75% (accuracy 93.25),
FLOPs 3.13e8, params 1.5e7. CIFAR VGG-16 as PFEC: BN after every conv, no dropout, classifier
Linear(512,512)+BN+ReLU+Linear. Used by: pfec_vgg16_cifar10_A (pretrained).

Recipe: the SFP CIFAR recipe (methods.md section 2, `common.cifar`), no pruning: 200 epochs,
batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.01 for epoch 1 then 0.1, x0.2 at 60/120/160. 3
seeds; seed 0 is the pretrained model of the rows that start from one.
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("dense_vgg16_cifar10", "vgg16", "cifar10")
    common.dense(c)
    common.paper(c, table="Baselines", source=common.PFEC_SOURCE,
                 row="VGG-16 baseline (PFEC Table 1)",
                 baseline_acc=93.25, note="PFEC Table 1: error 6.75")
    return c
