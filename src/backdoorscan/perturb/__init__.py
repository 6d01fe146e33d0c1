"""One perturbation engine for both subcommands, in pixel space [0, 1].

| module | holds |
|---|---|
| `deepfool.py` | batched (targeted) DeepFool steps |
| `project.py` | L2 / L-inf norms and projections onto their balls |
| `uap.py` | targeted UAPs per class (USB Alg. 1) and the untargeted L-inf UAP (Xue et al.) |
| `evaluate.py` | predictions in batches, targeted success rates, fooling rate |
| `triggers.py` | trigger x mask forms ("paper", "blend"): stamping, size, success |
| `cost.py` | Neural Cleanse's adaptive cost schedule, shared by Alg. 2 and the NC baseline |
"""

from .deepfool import deepfool
from .project import norm_of, project
from .uap import TargetedUAPs, UntargetedUAP, targeted_uaps, untargeted_uap

__all__ = ["TargetedUAPs", "UntargetedUAP", "deepfool", "norm_of", "project", "targeted_uaps", "untargeted_uap"]
