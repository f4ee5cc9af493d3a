"""ASFP control of the GHFP comparison: CIFAR-100, ResNet-110, pruning rate 30%, from scratch.

Paper row: "ASFP control, CIFAR-100, ResNet-110, 30%" (control of ghfp_resnet110_cifar100).
ASFP's own paper was not available (methods.md section 3): no published figures (-1).

Recipe: as ghfp_resnet110_cifar100 (SFP CIFAR recipe, 200 epochs, L2, every conv, residual
'scatter') with ASFP's rate schedule P_t = P (1 - exp(-k t)), k = ln 4 / (T/8). 3 seeds.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import common  # noqa: E402  (experiments/configs/common.py)


def get_config():
    c = common.cifar("asfp_resnet110_cifar100", "resnet110", "cifar100")
    common.soft(c, "asfp", 0.3)
    common.paper(c, table="GHFP", source="ASFP (He et al.), control of " + common.GHFP_SOURCE,
                 row="ASFP control, CIFAR-100, ResNet-110, 30%",
                 note="control of ghfp_resnet110_cifar100; no published figures in the reference")
    return c
