"""No verdict without evidence: checks that a scan could measure the model before its result is believed.

A model behind non-differentiable preprocessing, with a wrong normalisation, untrained, or returning several
tensors gives UAPs and triggers that succeed nowhere; the per-class sizes then say nothing, and "clean" would be
a guess. Each check records its figure; a failed check makes the verdict `inconclusive` (exit 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

GRADIENT_PROBE = 32  # samples whose input gradient is measured


@dataclass
class Evidence:
    """The measured checks (name -> figures and pass/fail) and, per failed check, its one-line reason."""

    checks: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the data limited the scan, short of making it inconclusive

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def reasons(self) -> list[str]:
        """One line per failed check, in the order the checks ran."""
        return list(self.failures.values())

    def record(self, name: str, ok: bool, reason: str, **figures: object) -> None:
        """Store a check's figures; a failure also stores its one-line reason."""
        self.checks[name] = {"ok": bool(ok), **figures}
        if not ok:
            self.failures[name] = reason


def min_accuracy(num_classes: int) -> float:
    """Clean accuracy a usable model must reach: chance plus 20 points (0.3 for 10 classes)."""
    return min(0.95, 1.0 / num_classes + 0.2)


MIN_CLASSES = 3  # classes the clean samples must cover: a scan compares classes (MAD over their trigger sizes)


def check_coverage(evidence: Evidence, classes: torch.Tensor, labels_from: str, k: int) -> None:
    """The samples' classes (their labels, else the model's predictions) must span several of the model's: with one
    or two, every other class's trigger is measured on the same few images and the comparison means nothing."""
    covered = int(torch.unique(classes.cpu()).numel()) if len(classes) else 0
    need = min(k, MIN_CLASSES)
    by = "labels" if labels_from in ("file", "folders") else "predicted classes"
    evidence.record(
        "class_coverage",
        covered >= need,
        f"the clean samples cover {covered} of the model's {k} classes (by their {by}); a scan compares classes "
        f"and needs samples of at least {need}: give clean samples of every class",
        covered=covered,
        required=need,
        num_classes=k,
    )
    if need <= covered < k:
        evidence.notes.append(
            f"the clean samples cover {covered} of {k} classes: pairs from the {k - covered} missing source "
            "classes were not measured"
        )
    if labels_from == "predictions":
        evidence.notes.append(
            "the clean samples are unlabelled: their classes are the model's own predictions, so a backdoor's "
            "effect on them goes unseen; labelled samples (class folders or y in an .npz) give a firmer verdict"
        )


def check_predictions(evidence: Evidence, pred: torch.Tensor, y: torch.Tensor | None, labels_from: str, k: int) -> None:
    """Accuracy of the predictions on labelled samples (or, unlabelled, that they are not one class)."""
    if y is not None and labels_from in ("file", "folders"):
        top = int(y.max()) if len(y) else -1
        evidence.record(
            "labels_within_output",
            top < k,
            f"the data's labels reach class {top}, but the model outputs only {k} classes (wrong data for this model?)",
            max_label=top,
            num_classes=k,
        )
        if top < k:
            acc = float((pred.cpu() == y.cpu()).float().mean())
            need = min_accuracy(k)
            evidence.record(
                "clean_accuracy",
                acc >= need,
                f"clean accuracy on the labelled samples is {acc:.2f}, not above chance "
                f"({1 / k:.2f}) by enough (needs {need:.2f}): wrong preprocessing (--mean/--std, "
                "--input-size), wrong data, or an untrained model",
                accuracy=round(acc, 4),
                required=round(need, 4),
            )
    else:
        share = float(torch.bincount(pred.cpu(), minlength=k).max()) / max(len(pred), 1)
        evidence.record(
            "prediction_spread",
            k < 3 or share <= 0.5,
            f"{share:.0%} of the unlabelled samples get one class: the model (or its preprocessing) "
            "does not tell the classes apart",
            largest_class_share=round(share, 4),
        )


def check_gradients(evidence: Evidence, model: nn.Module, x: torch.Tensor, pred: torch.Tensor) -> None:
    """The loss must have a non-zero gradient with respect to the input on most samples."""
    xs = x[:GRADIENT_PROBE].clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(xs), pred[:GRADIENT_PROBE].to(x.device))
            (grad,) = torch.autograd.grad(loss, xs)
    except RuntimeError as exc:  # e.g. an output that does not require grad
        evidence.record(
            "input_gradient",
            False,
            f"the model gives no input gradient ({str(exc).splitlines()[0][:80]})"
            ": the scan's perturbations cannot be optimised",
            nonzero_share=0.0,
        )
        return
    per_sample = grad.flatten(1).abs().amax(1)
    share = float(((per_sample > 0) & torch.isfinite(per_sample)).float().mean())
    evidence.record(
        "input_gradient",
        share >= 0.5,
        f"the input gradient is zero on {1 - share:.0%} of samples (non-differentiable preprocessing "
        "such as rounding inside the model?): the scan's perturbations cannot be optimised",
        nonzero_share=round(share, 4),
    )


def _answers_differ(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Two sets of logits for the same samples: the median relative change, and how often the predictions agree."""
    change = (other - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1).clamp_min(1e-6)
    return float(change.median()), float((other.argmax(1) == reference.argmax(1)).float().mean())


GRID_PROBE = 64  # samples for the input-grid check
GRID_TOLERANCE = 0.05  # largest median relative change of the logits within half a pixel level


def check_grid(evidence: Evidence, model: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    """The model must answer the same on on-grid samples and on the same samples moved off the 8-bit grid by less
    than half a level; a model that tells them apart can show the scanner another network than the one deployed."""
    grid = getattr(getattr(model, "spec", None), "grid", None)
    if not grid:
        return
    xs = x[:GRID_PROBE]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    jitter = ((torch.rand(xs.shape, generator=gen) - 0.5) * (0.9 / float(grid))).to(xs.device)
    with torch.no_grad():
        on = model(xs)
        off = model((xs + jitter).clamp(0, 1), on_grid=False)
    change, agree = _answers_differ(on, off)
    evidence.record(
        "input_grid",
        change <= GRID_TOLERANCE and agree >= 0.9,
        f"the model's logits change by {change:.0%} (predictions agree on {agree:.0%}) when the inputs "
        "move less than half a pixel level off the 8-bit grid: it tells the scanner's inputs from "
        "deployed ones",
        relative_logit_change=round(change, 6),
        agreement=round(agree, 4),
    )


def check_search(evidence: Evidence, uap_success: torch.Tensor | None, asr: torch.Tensor, asr_min: float) -> None:
    """After the scan: some targeted UAPs succeeded, and reversed triggers work for most classes."""
    if uap_success is not None:
        best = float(uap_success.max())
        evidence.record(
            "uap_success",
            best >= 0.1,
            f"no targeted UAP moved more than {best:.0%} of samples to its class: the scan measured nothing",
            best=round(best, 4),
        )
    working = float((asr >= asr_min).float().mean())
    evidence.record(
        "trigger_success",
        working >= 0.5,
        f"reversed triggers reach ASR {asr_min:.2f} for only {working:.0%} of classes: the trigger sizes "
        "do not measure the classes",
        share_of_classes=round(working, 4),
    )


BATCH_PROBE = 16  # samples for the batch-size check
BATCH_TOLERANCE = 1e-3  # largest median relative change of the logits between batch sizes (float32 rounding)


def check_batch_sizes(evidence: Evidence, model: nn.Module, x: torch.Tensor) -> None:
    """The model must answer the same one image at a time as in a batch: the scan measures it in batches, and a
    model backdoored only at batch size 1 (a deployment serving single requests) would show the scanner a clean
    twin. Batch norm in eval mode, like every layer of a plain classifier, does not care."""
    xs = x[:BATCH_PROBE]
    if len(xs) < 2:
        return
    with torch.no_grad():
        batched = model(xs)
        single = torch.cat([model(xs[i : i + 1]) for i in range(len(xs))])
    change, agree = _answers_differ(batched, single)
    evidence.record(
        "batch_size",
        change <= BATCH_TOLERANCE and agree == 1.0,
        f"the model answers differently one image at a time than in a batch (logits change by {change:.1%}, "
        f"predictions agree on {agree:.0%}): what the scan measures in batches is not what a deployment serving "
        "single images runs",
        relative_change=round(change, 6),
        agreement=round(agree, 4),
    )
