"""Lines and rows built once for every renderer (terminal, Markdown): what the families found and what "clean"
covers."""

from __future__ import annotations

from typing import Any

FAMILY_NAMES = {
    "universal": "universal triggers (USB)",
    "pairs": "source-specific pairs and all-to-all mappings",
    "warp": "warps (WaNet)",
}


NOT_COVERED = "triggers a model recognises with non-differentiable logic (docs/method.md, Limits)"
# how a source-specific finding line names the size measure that flagged it (usb.pair_rule.PAIR_MEASURES)
MEASURE_WORDS = {
    "l1": "its L1",
    "objective": "the inversion's objective",
    "support": "the pixels it needs",
    "compact": "its L1, a compact patch (by its mask, or working from one small window)",
}


def covered_line(scan) -> str:
    """Which backdoor families the verdict speaks for, and what trigger inversion cannot see."""
    unmeasured = [
        FAMILY_NAMES[f] + " (not measured: too few clean samples a class)"
        for f in scan.settings.covers
        if f not in scan.covered
    ]
    return (
        "families covered: "
        + (", ".join(FAMILY_NAMES[f] for f in scan.covered) or "none")
        + f"; not covered: {', '.join([*unmeasured, NOT_COVERED])}"
    )


def note_lines(scan) -> list[str]:
    """How the data limited the scan (unlabelled samples, classes missing, files unread, fewer samples)."""
    return list(scan.evidence.notes)


def finding_lines(scan) -> list[str]:
    """One line per family that fired: a universal target, a (source, target) pair, a mapping, or a warp."""
    fam = scan.families
    if fam is None or not fam.findings:
        return []
    lines = []
    mapping = [f for f in fam.findings if f.family == "all-to-all"]
    if mapping:
        pairs = ", ".join(f"{f.source}->{f.target}" for f in sorted(mapping, key=lambda f: f.source))
        lines.append(f"all-to-all mapping: {pairs} (one patch, small against the pair patches, moves each class)")
    for f in fam.findings:
        if f.family == "source-specific":
            lines.append(
                f"source-specific: class {f.source} -> {f.target} (patch L1 {f.size:.1f} px; index by "
                f"{MEASURE_WORDS.get(f.measure or 'l1', 'its size')} {f.index:.2f} > {f.threshold:.2f})"
            )
        elif f.family == "warp":
            lines.append(
                f"warp: target {f.target} (mean displacement {f.size:.2f} px, index {f.index:.2f} > {f.threshold:.2f})"
            )
    return lines


def class_columns(scan) -> list[str]:
    """The per-class table's columns (terminal and Markdown)."""
    staged = scan.staging is not None and scan.staging.mode == "staged"
    return [
        "class",
        *(["refined as", "stage-1 rank"] if staged else []),
        "UAP success",
        "UAP norm",
        "L1 of reversed trigger",
        "size / median",
        "anomaly index",
        "ASR",
        "flagged",
    ]


def class_rows(scan) -> list[tuple[Any, list[str]]]:
    """(the class's result, its cells after the class cell) per refined class; Neural Cleanse has no Alg. 1, so its
    UAP columns read n/a rather than zeros. The class cell is left to each renderer (names come from the file)."""
    staged = scan.staging is not None and scan.staging.mode == "staged"
    no_uap = scan.settings.method != "usb"
    rows = []
    for c in scan.classes:
        rows.append(
            (
                c,
                [
                    *([c.role, str(c.stage1_rank)] if staged else []),
                    "n/a" if c.uap_success is None else f"{c.uap_success:.2f}",
                    "n/a" if no_uap else f"{c.uap_norm:.2f}",
                    f"{c.l1_norm:.2f}",
                    f"{c.size_ratio:.2f}",
                    f"{c.anomaly_index:.2f}",
                    f"{c.asr:.2f}",
                    c.flag_word,
                ],
            )
        )
    return rows
