"""SFP, CIFAR-10, ResNet-56, pruning rate 40% (keep 0.6), starting from a pretrained model.

Paper row (SFP, IJCAI 2018: "Can start from scratch or from a pretrained model"): "ResNet-56,
40%, from a pretrained model": baseline 93.59, FLOPs reduction 52.6% (SFP's formula at keep
0.6). The reference (methods.md) prints no accuracy for the pretrained variant, so
paper.pruned_acc is -1 (not given); compare with the from-scratch row sfp_resnet56_cifar10
(92.26 +- 0.31) and the dense baseline.

Pretrained model: config.pretrained = experiments/runs/dense_resnet56_cifar10/seed0, the seed-0
run of the dense baseline row dense_resnet56_cifar10 (its best checkpoint's weights, fresh
optimizer). experiments/run.py trains that baseline first when it is missing and rewrites the
path to its --runs-dir; every seed of this row starts from the same baseline. Recipe otherwise
as the from-scratch row (methods.md section 2: the official script only switches on the
pretrained weights): 200 epochs, batch 128, SGD Nesterov 0.9, wd 5e-4, LR 0.01 then 0.1, x0.2
at 60/120/160; L2, every conv pruned, residual 'scatter'. 3 seeds.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import common  # noqa: E402  (experiments/configs/common.py)


def get_config():
    c = common.cifar("sfp_resnet56_cifar10_pretrained", "resnet56")
    common.soft(c, "sfp", 0.4)
    c.pretrained = common.run_dir("dense_resnet56_cifar10", 0)
    common.paper(c, table="SFP",
                 source="SFP (He et al., IJCAI 2018, arXiv 1808.06866), CIFAR-10 from a pretrained model",
                 row="ResNet-56, 40%, from a pretrained model", baseline_acc=93.59,
                 macs_reduction=52.6,
                 note="pruned accuracy not given in the reference")
    return c
