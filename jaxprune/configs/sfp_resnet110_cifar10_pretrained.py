"""SFP, CIFAR-10, ResNet-110, pruning rate 30% (keep 0.7), starting from a trained model.

Paper row (SFP, IJCAI 2018, from a trained model; methods.md section 2): "ResNet-110, 30%, from a trained model":
93.68 -> 93.86, FLOPs reduction 40.8% (SFP's formula at keep 0.7).

Trained model: no trained ResNet-110 is available offline, so this row starts from the project's
own dense baseline, config.pretrained = experiments/runs/dense_resnet110_cifar10/seed0 (row
dense_resnet110_cifar10: 200 epochs on the SFP recipe), which experiments/run.py trains first.
Both together are 400 ResNet-110 epochs: a GPU row.

Recipe (`common.from_trained`): the SFP CIFAR recipe at one tenth of the learning rate (LR 0.001
for the first epoch, then 0.01, x0.2 at epochs 60/120/160; 200 epochs, batch 128, SGD Nesterov
0.9, wd 5e-4); L2, every conv pruned, re-selected after every epoch, residual 'scatter'. 3 seeds
(every seed starts from the same trained model).
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("sfp_resnet110_cifar10_pretrained", "resnet110")
    common.soft(c, "sfp", 0.3)
    common.from_trained(c)
    c.pretrained = common.run_dir("dense_resnet110_cifar10", 0)
    common.paper(c, table="SFP",
                 source="SFP (He et al., IJCAI 2018, arXiv 1808.06866), CIFAR-10 from a trained model",
                 row="ResNet-110, 30%, from a trained model", baseline_acc=93.68, pruned_acc=93.86,
                 macs_reduction=40.8)
    return c
