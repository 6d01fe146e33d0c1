"""SARIF 2.1.0 for a fleet scan: one result per suspect model (and one per model that could not be scanned), the
format GitHub code scanning and other security dashboards read.

A suspect model is an `error` under rule BDS001 with its target classes, anomaly index and report folder in the
result's properties; a model that could not be scanned or measured is a `warning` under BDS002, so that a gate
never reads silence as clean. Clean models give no result.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.errors import ExitCode
from ..core.jsonout import dumps

VERDICTS = (ExitCode.CLEAN, ExitCode.BACKDOOR)  # the scan ran and decided

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULES = [
    {
        "id": "BDS001",
        "name": "BackdoorSuspected",
        "shortDescription": {
            "text": "The model carries a backdoor (trojan): a class is reached by an outlier-small trigger."
        },
        "fullDescription": {
            "text": "USB (Universal Soldier for Backdoor detection) reversed a trigger for the named "
            "target class(es) far smaller than for the other classes; inputs stamped with it "
            "are sent to the target."
        },
        "help": {
            "text": "Open the report folder named in the result's properties: report.md, the reversed "
            "triggers (triggers.png) and the per-class figures. Do not deploy the model."
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "ml", "backdoor"]},
    },
    {
        "id": "BDS002",
        "name": "NotScanned",
        "shortDescription": {"text": "The model could not be scanned or measured, so it is not known to be clean."},
        "defaultConfiguration": {"level": "warning"},
        "properties": {"tags": ["security", "ml"]},
    },
]


def source_root() -> Path:
    """What `%SRCROOT%` stands for: the checkout (`$GITHUB_WORKSPACE` in a GitHub job), else the current folder."""
    return Path(os.environ.get("GITHUB_WORKSPACE") or os.getcwd()).resolve()


def _model_file(path: Path) -> Path:
    """The file that is the model: a hub folder is named by its weights file, which code scanning can show."""
    if path.is_dir():
        from ..loading.hub import WEIGHT_FILES

        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
    return path


def _location(path: str, root: Path) -> dict[str, Any]:
    """A model's location relative to the source root (normalised, symbolic links resolved), or a file URI for a
    model outside it."""
    resolved = _model_file(Path(path)).resolve()
    try:
        artifact = {"uri": resolved.relative_to(root).as_posix(), "uriBaseId": "%SRCROOT%"}
    except ValueError:
        artifact = {"uri": resolved.as_uri()}
    return {"physicalLocation": {"artifactLocation": artifact}}


def _fingerprint(rule: str, location: dict[str, Any], sha: str | None) -> dict[str, str]:
    """Stable across runs and machines: the rule, where the model is and what it is (its sha256 when known), so
    that code scanning tracks one alert per model and closes it when the model changes."""
    uri = location["physicalLocation"]["artifactLocation"]["uri"]
    digest = hashlib.sha256(f"{rule}\0{uri}\0{sha or ''}".encode()).hexdigest()
    return {"backdoorscanModel/v1": digest, **({"modelSha256": sha} if sha else {})}


def fleet_sarif(result) -> dict[str, Any]:
    """The SARIF log of a `FleetResult`."""
    results = []
    root = source_root()
    for item in result.items:
        where = _location(item.path, root)
        location = [where]
        sha = str((item.report or {}).get("model", {}).get("sha256") or "") or None
        if item.verdict == "backdoor":
            report = item.report
            names = {c["class"]: c.get("name") for c in report.get("classes", [])}
            index = {c["class"]: c.get("anomaly_index") for c in report.get("classes", [])}
            targets = ", ".join(f"{t} ({names[t]})" if names.get(t) else str(t) for t in item.targets)
            results.append(
                {
                    "ruleId": "BDS001",
                    "ruleIndex": 0,
                    "level": "error",
                    "message": {"text": f"Backdoor suspected in {Path(item.path).name}: target class(es) {targets}."},
                    "locations": location,
                    "partialFingerprints": _fingerprint("BDS001", where, sha),
                    "properties": {
                        "targetClasses": item.targets,
                        "anomalyIndex": {str(t): index.get(t) for t in item.targets},
                        "margin": report.get("margin"),
                        "report": item.report_dir,
                        "cached": item.cached,
                    },
                }
            )
        elif item.verdict in ("inconclusive", "error"):
            why = item.error or "; ".join(item.report.get("reasons", []) if item.report else []) or item.verdict
            results.append(
                {
                    "ruleId": "BDS002",
                    "ruleIndex": 1,
                    "level": "warning",
                    "message": {"text": f"{Path(item.path).name} was not scanned to a verdict: {why}"},
                    "locations": location,
                    "partialFingerprints": _fingerprint("BDS002", where, sha),
                    "properties": {"exitCode": item.exit_code, "report": item.report_dir},
                }
            )
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "backdoorscan",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "rules": RULES,
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": root.as_uri() + "/"}},
                "invocations": [{"executionSuccessful": result.exit_code in VERDICTS, "exitCode": result.exit_code}],
                "results": results,
                "properties": {"models": len(result.items), "cached": sum(i.cached for i in result.items)},
            }
        ],
    }


def write_sarif(result, path: Path) -> None:
    """Write the SARIF log atomically."""
    from .writer import write_text_atomic

    write_text_atomic(Path(path), dumps(fleet_sarif(result)) + "\n")
