"""PFEC, ImageNet (ILSVRC-2012), ResNet-34-pruned-C: the projection (shortcut) conv of stage 3
and, with the same indices, the second convs that add to it, by 20%.

Paper row (PFEC Table 1): "ResNet-34-pruned-C": top-1 error 27.52% (top-1 accuracy 72.48)
against the baseline's 26.77% (73.23); FLOPs pruned 7.5%, params pruned 7.2%.

Recipe (methods.md section 1, `common.pfec` on `common.imagenet`): start from the trained dense
baseline config.pretrained = experiments/runs/dense_resnet34_imagenet/seed0 (row
dense_resnet34_imagenet; the runner trains it first when missing), prune one-shot by the L1
norm (named config 'resnet34-C', independent selection), retrain 20 epochs at a constant LR
0.001 (batch 256, momentum 0.9, wd 1e-4, ImageNet augmentation). Residual policy 'coupled'
(needed by ResNet-34-C's shared indices; the baseline uses it too). One seed.
"""

from jaxprune.configs import common


def get_config():
    c = common.imagenet("pfec_resnet34_imagenet_C", "resnet34", epochs=20)
    common.pfec(c, "resnet34-C", "dense_resnet34_imagenet", epochs=20, residual="coupled")
    common.paper(c, table="PFEC", source=common.PFEC_SOURCE, row="ResNet-34-pruned-C",
                 baseline_acc=73.23, pruned_acc=72.48, macs_reduction=7.5,
                 params_reduction=7.2, metric="top-1", note="Table 1 top-1 errors: 26.77 -> 27.52")
    return c
