"""HFP, ImageNet (ILSVRC-2012), ResNet-50, target: 60% fewer multiplications.

Paper row (HFP, Enderich et al., WACV 2021, abstract): "ImageNet ResNet-50, 60% of the
multiplications pruned" with "no significant accuracy loss": multiplications reduction 60.0%;
no accuracy figure in the reference (paper.* accuracies -1; ResNet-50's usual baseline is SFP's
76.15 top-1).

Recipe: trained from scratch with the SFP ImageNet recipe (methods.md section 2: 100 epochs,
batch 256, LR 0.1 x0.1 every 30 epochs, wd 1e-4, momentum 0.9), HFP penalty on the BN-scale
gates with a MACs target only (conv + FC multiplications, lam 1, residual policy 'coupled'),
hard pruning to the target at the end, 10 epochs of fine-tuning at LR 0.001 with the masks
fixed (our choice; methods.md 5 asks for fine-tuning, the paper's schedule was not available),
compaction. One seed.
"""

from jaxprune.configs import common


def get_config():
    c = common.imagenet("hfp_resnet50_imagenet", "resnet50")
    common.hfp(c, macs_reduction=0.6, finetune_epochs=10)
    common.paper(c, table="HFP", source=common.HFP_SOURCE,
                 row="ImageNet ResNet-50, 60% of the multiplications pruned",
                 macs_reduction=60.0, metric="top-1",
                 note="no significant accuracy loss (abstract)")
    return c
