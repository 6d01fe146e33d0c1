"""Short Markdown summaries fit for a CI job summary (e.g. $GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from ..core.escape import md_code, md_text

EVIDENCE = {
    "refined": "the refined triggers' L1",
    "uap": "the UAP norms (Alg. 1)",
    "combined": "the mean anomaly index of the UAP norms and the refined triggers' L1",
}


def scan_markdown(scan) -> str:
    """Verdict, targets and the per-class table of a model scan."""
    model = scan.model.get("path") or scan.model.get("description")
    names = {c.cls: c.name for c in scan.classes}
    targets = ", ".join(f"{t} ({md_text(names[t])})" if names.get(t) else str(t) for t in scan.target_classes)
    head = (
        "**Backdoor suspected**, target class(es) " + targets
        if scan.verdict == "backdoor"
        else "**No backdoor found**"
        if scan.verdict == "clean"
        else _inconclusive("scan", scan.reasons)
    )
    lines = [
        f"### backdoorscan: {md_code(model, in_table=False)}",
        "",
        head,
        "",
        f"Method {scan.settings.method.upper()}, {scan.data['samples']} clean samples, device {scan.device}, "
        f"{scan.timings.get('total', 0):.1f} s"
        + ("." if scan.margin is None else f"; the verdict is {scan.margin:.2f} anomaly-index units from flipping."),
        "",
        f"Decided on {EVIDENCE[scan.settings.decided_on]}.",
        "",
    ]
    if scan.verdict != "inconclusive":
        from .rows import covered_line, finding_lines

        # these lines are the tool's own words and numbers: nothing from the file, so no escaping to clutter them
        lines += [covered_line(scan)[0].upper() + covered_line(scan)[1:] + ".", ""]
        lines += [f"- {line}" for line in finding_lines(scan)] + ([""] if finding_lines(scan) else [])
    from .rows import note_lines

    if note_lines(scan):  # the data's limits: paths from the user's data appear in them, so escaped
        lines += ["Notes on the data:", ""] + [f"- {md_text(line)}" for line in note_lines(scan)] + [""]
    staged = scan.staging is not None and scan.staging.mode == "staged"
    if staged:
        lines += [f"Staged scan: {scan.staging.why}. The other classes were ranked by stage 1 only.", ""]
    if scan.threshold_note:
        lines += [scan.threshold_note[0].upper() + scan.threshold_note[1:] + ".", ""]
    from .rows import class_columns, class_rows

    header = class_columns(scan)
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + ":---:|"]
    for c, cells in class_rows(scan):
        name = f"{c.cls} ({md_text(c.name)})" if c.name else str(c.cls)
        flag = f"**{cells[-1]}**" if c.target else cells[-1]
        lines.append("| " + " | ".join([name, *cells[:-1], flag]) + " |")
    return "\n".join(lines) + "\n"


def _inconclusive(what: str, reasons: list[str]) -> str:
    """The inconclusive verdict of a scan or a screen, and its reasons (from the file: escaped)."""
    return f"**Inconclusive**: the {what} could not measure this model.\n\n" + "\n".join(
        f"- {md_text(reason)}" for reason in reasons
    )


def filter_markdown(result) -> str:
    """Counts and the per-class summary of a dataset screening (or why it is inconclusive)."""
    if result.verdict == "inconclusive":
        head = f"### backdoorscan filter: {md_code(result.input, in_table=False)}"
        return f"{head}\n\n{_inconclusive('screen', result.reasons)}\n"
    lines = [
        f"### backdoorscan filter: {md_code(result.input, in_table=False)}",
        "",
        f"{result.flagged} of {result.total} images flagged as trigger-carrying ({_how(result)}).",
        "",
    ]
    if result.suspected_target is not None:
        lines += [f"Flags concentrate on class {result.suspected_target}: a backdoor target is likely.", ""]
    lines += ["| predicted class | images | flagged | expected without a trigger |", "|---:|---:|---:|---:|"]
    for row in result.per_class:
        name = f"{row['class']} ({md_text(row['name'])})" if row.get("name") else str(row["class"])
        lines.append(f"| {name} | {row['images']} | {row['flagged']} | {row['expected']} |")
    return "\n".join(lines) + "\n"


def _how(result) -> str:
    if result.method == "strip":
        return f"STRIP, entropy threshold {result.threshold:.4f}"
    if result.method == "erase":
        return erased_line(result.triggers)
    own = result.rule.dominant if result.rule is not None else []
    extra = f"; own UAP and margin for dominant class(es) {', '.join(map(str, own))}" if own else ""
    return f"UAP L-inf epsilon {result.epsilon:.4f}, fooling rate {result.fooling_rate:.2f}{extra}"


def fleet_markdown(result) -> str:
    """The whole fleet in one Markdown table (a CI job summary)."""
    s = result.summary()["summary"]
    head = (
        f"### backdoorscan: {s['models']} model{'' if s['models'] == 1 else 's'}\n\n"
        f"**{s['backdoor']} suspect**, {s['clean']} clean, "
        f"{s['inconclusive']} inconclusive, {s['error']} not scanned ({s['cached']} from the cache); "
        f"exit code {s['exit_code']}.\n"
    )
    lines = [head, "| model | verdict | target classes | seconds | cached | report |", "|---|---|---|---:|:---:|---|"]
    for item in result.items:
        names = {c["class"]: c.get("name") for c in (item.report or {}).get("classes", [])}
        targets = ", ".join(f"{t} ({md_text(names[t])})" if names.get(t) else str(t) for t in item.targets)
        verdict = f"**{item.verdict}**" if item.verdict == "backdoor" else item.verdict
        if item.error:
            verdict += f": {md_text(item.error)}"
        lines.append(
            f"| {md_code(item.path)} | {verdict} | {targets} | {item.seconds:.1f} | "
            f"{'yes' if item.cached else ''} | {md_code(item.report_dir) if item.report_dir else ''} |"
        )
    return "\n".join(lines) + "\n"


def erased_line(triggers: list[dict]) -> str:
    """What an erasure screen undid: the patch triggers the model scan named, by target (and source)."""
    named = [
        f"{t['target']}" + (f" from {t['source']}" if t["source"] is not None else "")
        for t in triggers
        if t["family"] != "warp"
    ]
    return f"erasing the {len(named)} patch trigger(s) the model scan named (target {', '.join(named)})"
