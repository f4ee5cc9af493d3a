"""SFP, ImageNet (ILSVRC-2012), ResNet-34, pruning rate 30%, trained from scratch.

Paper row (SFP, IJCAI 2018): "ImageNet ResNet-34, 30%, from scratch": top-1 / top-5 73.92 /
91.62 -> 71.83 / 90.33, FLOPs reduction 41.1%.

Recipe (methods.md section 2, `common.imagenet`): 100 epochs, batch 256, LR 0.1 x0.1 every 30
epochs, weight decay 1e-4, Nesterov momentum 0.9 (the official script's), random-resized-crop 224 + flip, eval resize 256 +
center crop 224; L2 criterion; every conv pruned except the projection (downsample) convs;
residual policy 'scatter'. One seed (ImageNet). Data set name imagenet2012 (TFDS array_record
copy in $JAXPRUNE_DATA_DIR or TFDS's data dir).
"""

from jaxprune.configs import common


def get_config():
    c = common.imagenet("sfp_resnet34_imagenet", "resnet34", nesterov=True)
    common.soft(c, "sfp", 0.3, exclude=common.IMAGENET_EXCLUDE)
    common.paper(c, table="SFP", source=common.SFP_IMAGENET_SOURCE,
                 row="ImageNet ResNet-34, 30%, from scratch",
                 baseline_acc=73.92, pruned_acc=71.83, macs_reduction=41.1, metric="top-1",
                 note="top-5 91.62 -> 90.33")
    return c
