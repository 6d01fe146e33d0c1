"""One perturbation engine for both subcommands: batched DeepFool steps, norm-ball projections, UAPs."""

from .deepfool import deepfool
from .project import norm_of, project
from .uap import TargetedUAPs, UntargetedUAP, targeted_uaps, untargeted_uap

__all__ = ["TargetedUAPs", "UntargetedUAP", "deepfool", "norm_of", "project", "targeted_uaps", "untargeted_uap"]
