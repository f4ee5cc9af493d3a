"""Dense baseline: ImageNet (ILSVRC-2012) ResNet-34, no pruning; the pretrained model of the

PFEC ResNet-34 rows.

Paper row (PFEC Table 1): "ResNet-34 (ImageNet top-1 err)": error 26.77% (top-1 accuracy
73.23), FLOPs 3.64e9, params 2.16e7. (PFEC started from the torchvision model; SFP's own
ResNet-34 baseline is 73.92 top-1.)

Recipe (methods.md section 2, `common.imagenet`): 100 epochs, batch 256, LR 0.1 x0.1 every 30
epochs, weight decay 1e-4, momentum 0.9, random-resized-crop 224 + flip. One seed.
"""

from jaxprune.configs import common


def get_config():
    c = common.imagenet("dense_resnet34_imagenet", "resnet34")
    common.dense(c, residual="coupled")  # as the PFEC ResNet-34 rows that start from it
    common.paper(c, table="Baselines", source=common.PFEC_SOURCE,
                 row="ResNet-34 (ImageNet top-1 err)", baseline_acc=73.23, metric="top-1",
                 note="PFEC Table 1: error 26.77; SFP baseline 73.92")
    return c
