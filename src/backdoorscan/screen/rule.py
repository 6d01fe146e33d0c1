"""Xue et al.'s rule: an input whose prediction survives the untargeted UAP carries a trigger.

An untargeted UAP has dominant labels: clean images the model already gives such a label survive it, trigger or
not (on our zoos one to three classes hold nearly all the clean survivors, often the backdoor's target). An image
predicted as an ordinary class is flagged when its prediction survives the UAP (the paper's rule). An image
predicted as a dominant class must also either survive that class's own UAP (computed from its clean samples, at
the same radius) or survive the UAP by a margin that few of the class's clean samples reach (`UapRule`). Clean
images of the class fail both; a trigger, which the model obeys by a wide margin, passes at least one.

The rule's stored form (`--save-uap` / `--uap`) is `report/uap_file.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class UapRule:
    """The UAP and, per dominant class, its own UAP and the survival margin that counts as a trigger."""

    v: torch.Tensor  # (C, H, W)
    thresholds: torch.Tensor  # (K,): margin above which a dominant class's image counts as surviving; 0 otherwise
    class_v: dict[int, torch.Tensor] = field(default_factory=dict)  # dominant class -> its own UAP (C, H, W)

    def to(self, device: torch.device | str) -> UapRule:
        """The same screen on another device."""
        return UapRule(
            self.v.to(device), self.thresholds.to(device), {c: u.to(device) for c, u in self.class_v.items()}
        )

    @property
    def dominant(self) -> list[int]:
        """The classes screened with their own UAP and margin."""
        return sorted(self.class_v)


@torch.no_grad()
def survival_margins(
    model: nn.Module, x: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prediction without the UAP, prediction with it, and the predicted class's logit margin over the best other
    class with it (positive: the prediction survives)."""
    before = model(x).argmax(1)
    logits = model((x + v).clamp(0, 1))
    own = logits.gather(1, before[:, None]).squeeze(1)
    other = logits.scatter(1, before[:, None], float("-inf")).amax(1)
    return before, logits.argmax(1), own - other


@torch.no_grad()
def uap_rule(model: nn.Module, x: torch.Tensor, rule: UapRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions without and with the UAP, and which images are flagged (see the module docstring)."""
    before, after, margin = survival_margins(model, x, rule.v)
    flagged = after == before
    for c, u in rule.class_v.items():
        own = flagged & (before == c)
        if own.any():
            kept = model((x[own] + u).clamp(0, 1)).argmax(1) == c
            flagged[own] = kept | (margin[own] > rule.thresholds[c])
    return before, after, flagged
