"""Lines and rows built once for every renderer (terminal, Markdown): what the families found and what "clean"
covers."""

from __future__ import annotations

FAMILY_NAMES = {
    "universal": "universal triggers (USB)",
    "pairs": "source-specific and all-to-all pairs",
    "warp": "warps (WaNet)",
}


def covered_line(scan) -> str:
    """Which backdoor families the verdict speaks for."""
    return "families covered: " + ", ".join(FAMILY_NAMES[f] for f in scan.settings.covers)


def finding_lines(scan) -> list[str]:
    """One line per family that fired: a universal target, a (source, target) pair, a mapping, or a warp."""
    fam = scan.families
    if fam is None or not fam.findings:
        return []
    lines = []
    mapping = [f for f in fam.findings if f.family == "all-to-all"]
    if mapping:
        pairs = ", ".join(f"{f.source}->{f.target}" for f in sorted(mapping, key=lambda f: f.source))
        lines.append(f"all-to-all mapping: {pairs} (pair patches an outlier small against all pairs)")
    for f in fam.findings:
        if f.family == "source-specific":
            lines.append(
                f"source-specific: class {f.source} -> {f.target} (patch L1 {f.size:.1f} px, index "
                f"{f.index:.2f} > {f.threshold:.2f})"
            )
        elif f.family == "warp":
            lines.append(
                f"warp: target {f.target} (mean displacement {f.size:.2f} px, index {f.index:.2f} > {f.threshold:.2f})"
            )
    return lines
