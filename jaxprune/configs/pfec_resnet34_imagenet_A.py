"""PFEC, ImageNet (ILSVRC-2012), ResNet-34-pruned-A: 30% of the first conv of every block in
stages 1-3, skipping layers 2, 8, 14, 16, 26, 28, 30, 32.

Paper row (PFEC Table 1): "ResNet-34-pruned-A": top-1 error 27.44% (top-1 accuracy 72.56)
against the baseline's 26.77% (73.23); FLOPs pruned 15.5%, params pruned 7.6%.

Recipe (methods.md section 1, `common.pfec` on `common.imagenet`): start from the trained dense
baseline config.pretrained = experiments/runs/dense_resnet34_imagenet/seed0 (row
dense_resnet34_imagenet; the runner trains it first when missing), prune one-shot by the L1
norm (named config 'resnet34-A', independent selection), retrain 20 epochs at a constant LR
0.001 (batch 256, momentum 0.9, wd 1e-4, ImageNet augmentation). Residual policy 'coupled'
(needed by ResNet-34-C's shared indices; the baseline uses it too). One seed.
"""

from jaxprune.configs import common


def get_config():
    c = common.imagenet("pfec_resnet34_imagenet_A", "resnet34", epochs=20)
    common.pfec(c, "resnet34-A", "dense_resnet34_imagenet", epochs=20, residual="coupled")
    common.paper(c, table="PFEC", source=common.PFEC_SOURCE, row="ResNet-34-pruned-A",
                 baseline_acc=73.23, pruned_acc=72.56, macs_reduction=15.5,
                 params_reduction=7.6, metric="top-1", note="Table 1 top-1 errors: 26.77 -> 27.44")
    return c
