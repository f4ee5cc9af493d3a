"""SFP, CIFAR-10, ResNet-56, pruning rate 40% (keep 0.6), starting from a trained model.

Paper row (SFP, IJCAI 2018, from a trained model; methods.md section 2): "ResNet-56, 40%, from a
trained model": 93.59 -> 93.35, FLOPs reduction 52.6% (SFP's formula at keep 0.6).

Trained model: config.pretrained = experiments/runs/dense_resnet56_cifar10/seed0, the seed-0
run of the dense baseline row dense_resnet56_cifar10 (its best checkpoint's weights, fresh
optimizer); experiments/run.py trains it first when it is missing. The offline trained ResNet-56
(93.39%) is used instead with `jaxprune import` + `jaxprune prune` (RESULTS.md).

Recipe (`common.from_trained`): the SFP CIFAR recipe at one tenth of the learning rate, as the
SFP/FPGM authors prune a trained model (FPGM section 4.1) and as the reference reimplementation
runs it: 200 epochs, batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.001 for the first epoch, then
0.01, x0.2 at epochs 60/120/160; L2, every conv pruned, re-selected after every epoch, residual
'scatter'. 3 seeds (every seed starts from the same trained model).
"""

from jaxprune.configs import common


def get_config():
    c = common.cifar("sfp_resnet56_cifar10_pretrained", "resnet56")
    common.soft(c, "sfp", 0.4)
    common.from_trained(c)
    c.pretrained = common.run_dir("dense_resnet56_cifar10", 0)
    common.paper(c, table="SFP",
                 source="SFP (He et al., IJCAI 2018, arXiv 1808.06866), CIFAR-10 from a trained model",
                 row="ResNet-56, 40%, from a trained model", baseline_acc=93.59, pruned_acc=93.35,
                 macs_reduction=52.6,
                 note="pruned accuracy as printed by Torch-Pruning's benchmark table: 93.36")
    return c
