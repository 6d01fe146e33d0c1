"""The dataset filter on the families zoo (issue 25, item 6): FRR and BASR after filtering, per family.

    .venv/bin/python benchmarks/filtering_families.py --zoo bench-out/zoo-families

Screening set per model: held-out clean test images (rows 2,000-2,999, outside the clean samples: MNIST's bundled
digits, or, for a CIFAR-10 zoo, whose clean.npz is test rows 0-1,999, ../shared's archive), and the same images
stamped with the model's trigger where the trigger applies and changes the label (a source-specific patch: the
source's images only; all-to-all: every image, to its own target; WaNet: every non-target image). FRR = clean
images flagged; BASR after filtering = triggered images that pass the filter and still get the backdoor's
label. Clean models are screened too (FRR only). Resumable: models already in OUT are kept.

    .venv/bin/python benchmarks/filtering_families.py --zoo bench-out/zoo12 --method erase \
        --out docs/results/families_filtering_erase.json

`--method erase` screens with the triggers each model's default scan named (`filter --method erase`): the scan
runs once per model and its triggers.safetensors is kept in ZOO/triggers/ (a model whose scan named none is
recorded as not screened: its triggered digits all pass). `--models` picks models by a regular expression.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab.data import cifar10, mnist
from backdoorscan import FilterSettings, ModelSource, filter_dataset, scan_model
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import to_uint8_images
from backdoorscan.report.trigger_file import TriggerFile, save_triggers
from backdoorscan.report.writer import write_text_atomic

from common import BUNDLED_TEST, device_name
from zoo_families import attack_of


def screening_set(
    record: dict, xs: torch.Tensor, ys: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
    """The clean digits, then the triggered ones; which rows are triggered; the label each triggered row should
    get; and the row of the clean digit each triggered one was stamped on."""
    attack = attack_of(record)
    if attack is None:
        empty = torch.empty(0, dtype=torch.long)
        return xs, np.zeros(len(xs), dtype=bool), empty, empty
    expected = attack.expected(ys)
    keep = attack.applies(ys) & (expected != ys)
    triggered = attack.stamp(xs[keep])
    kind = np.r_[np.zeros(len(xs)), np.ones(len(triggered))].astype(bool)
    return torch.cat([xs, triggered]), kind, expected[keep], torch.nonzero(keep).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo-families")
    parser.add_argument("--out", default="docs/results/families_filtering.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="uap", choices=["uap", "erase"], help="the screen's rule")
    parser.add_argument("--models", default="", help="a regular expression the model names must match")
    parser.add_argument(
        "--erase-grow", type=int, default=FilterSettings.erase_grow, help="erase: how far a region may grow (1: never)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo, out = Path(args.zoo), Path(args.out)
    records = json.loads((zoo / "zoo.json").read_text())
    xs, ys, clean = screened_images(zoo, records)
    dev = resolve_device(args.device)
    saved = json.loads(out.read_text()) if out.exists() else {"device": device_name(dev), "models": {}}
    for name, record in records.items():
        if name in saved["models"] or not re.search(args.models, name):
            continue
        x, kind, expected, origin = screening_set(record, xs, ys)
        t = time.perf_counter()
        triggers = _triggers(zoo, record, clean, dev) if args.method == "erase" else None
        if args.method == "erase" and triggers is None:  # the scan named nothing: nothing to erase
            res = None
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "screen.npz"
                np.savez(path, x=to_uint8_images(x))
                res = filter_dataset(
                    ModelSource(zoo / record["path"]),
                    clean,
                    path,
                    settings=FilterSettings(method=args.method, erase_grow=args.erase_grow),
                    triggers=triggers,
                    device=dev,
                )
        screened = res is not None and res.verdict != "inconclusive"  # else nothing is filtered out
        flagged = np.array([i.flagged for i in res.items]) if screened else np.zeros(len(x), dtype=bool)
        pred = torch.tensor([i.prediction for i in res.items]) if screened else _predict(zoo, record, x, clean, dev)
        hit = (pred[torch.from_numpy(kind)] == expected).numpy() if kind.any() else np.zeros(0, dtype=bool)
        # a triggered digit whose clean version the model already gives the backdoor's label is no backdoor's
        # success: the model's own error, which no screen of triggers can remove (reported apart)
        earned = (pred[origin] != expected).numpy() if kind.any() else np.zeros(0, dtype=bool)
        saved["models"][name] = {
            "family": record["family"],
            "aside": record["aside"],
            "verdict": res.verdict if res is not None else "not screened (the scan named no trigger)",
            "reasons": res.reasons if res is not None else [],
            "frr": round(float(flagged[~kind].mean()), 4),
            "triggered": int(kind.sum()),
            "basr_before": round(float(hit.mean()), 4) if hit.size else None,
            "basr_after": round(float((hit & ~flagged[kind]).mean()), 4) if hit.size else None,
            # the same, the triggered digits whose clean version already got the backdoor's label left out
            "basr_after_earned": round(float((hit & earned & ~flagged[kind]).sum() / max(earned.sum(), 1)), 4)
            if hit.size
            else None,
            "epsilon": res.epsilon if res is not None else None,
            "triggers": res.triggers if res is not None else [],
            "seconds": round(time.perf_counter() - t, 1),
        }
        write_text_atomic(out, json.dumps(saved, indent=1) + "\n")
        print(name, json.dumps(saved["models"][name]), flush=True)
    print(table(saved["models"]))


def screened_images(zoo: Path, records: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The clean images to screen (test rows 2,000-2,999), their labels, and the clean samples the scans use: the
    zoo's clean.npz (CIFAR-10: test rows 0-1,999) or the bundled MNIST digits (rows 0-1,999 of the same test set)."""
    datasets = {r.get("dataset", "mnist") for r in records.values()}
    if datasets == {"cifar10"}:
        xt, yt, _ = cifar10("test")
        return xt[2000:3000], yt[2000:3000], str(zoo / "clean.npz")
    if datasets != {"mnist"}:
        raise SystemExit(f"{zoo}: one dataset a zoo, MNIST or CIFAR-10 (found {sorted(datasets)})")
    xt, yt, _ = mnist("test")
    return xt[2000:3000], yt[2000:3000], str(BUNDLED_TEST)


def _triggers(zoo: Path, record: dict, clean: str, dev: torch.device) -> Path | None:
    """The triggers the model's default scan named (scanned once, kept in ZOO/triggers/); None when it named none."""
    folder = zoo / "triggers"
    path, none = folder / f"{record['name']}.safetensors", folder / f"{record['name']}.none"
    if not path.exists() and not none.exists():
        found = scan_model(ModelSource(zoo / record["path"]), clean, device=dev).found_triggers()
        keep_triggers(zoo, record["name"], found)
    return path if path.exists() else None


def keep_triggers(zoo: Path, name: str, found: TriggerFile | None) -> None:
    """Keep what a model's default scan named in ZOO/triggers/ (NAME.safetensors, or NAME.none when it named
    nothing), where the erasure screen looks for it; `detection_families.py` keeps its default scans' there too."""
    folder = zoo / "triggers"
    folder.mkdir(exist_ok=True)
    if found is not None:
        save_triggers(folder / f"{name}.safetensors", found)
    else:
        (folder / f"{name}.none").write_text("the scan named no trigger\n")


def _predict(zoo: Path, record: dict, x: torch.Tensor, clean: str, dev: torch.device) -> torch.Tensor:
    """The model's predictions of the screened digits (for a model the erasure screen did not screen)."""
    from backdoorscan.loading import prepare
    from backdoorscan.perturb.evaluate import predict

    ready = prepare(ModelSource(zoo / record["path"]), clean, samples=10, seed=0, device=dev)
    return predict(ready.model, x.to(dev)).cpu()


def table(models: dict[str, dict]) -> str:
    """One line per family and part: models, mean FRR, mean BASR before and after (and the worst model's), after
    with the model's own errors left out, and how many models meet the goal (BASR <= 1 % at FRR <= 10 %) by it."""
    lines = [
        "| family | part | models | FRR (max) | BASR before | BASR after filtering (max) | the model's own errors "
        "left out (max) | at the goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family in dict.fromkeys(m["family"] for m in models.values()):
        for part, aside in (("main", False), ("aside", True)):
            rs = [m for m in models.values() if m["family"] == family and bool(m["aside"]) == aside]
            if not rs:
                continue
            frr = [m["frr"] for m in rs]
            before = [m["basr_before"] for m in rs if m["basr_before"] is not None]
            after = [m["basr_after"] for m in rs if m["basr_after"] is not None]
            earned = [m["basr_after_earned"] for m in rs if m.get("basr_after_earned") is not None]
            goal = sum(m["frr"] <= 0.1 and (m.get("basr_after_earned") or 0) <= 0.01 for m in rs)
            lines.append(
                f"| {family} | {part} | {len(rs)} | {100 * np.mean(frr):.1f}% ({100 * max(frr):.1f}%) | "
                + (f"{100 * np.mean(before):.1f}% | " if before else "- | ")
                + (f"{100 * np.mean(after):.2f}% ({100 * max(after):.1f}%) | " if after else "- | ")
                + (f"{100 * np.mean(earned):.2f}% ({100 * max(earned):.1f}%) | " if earned else "- | ")
                + f"{goal}/{len(rs)} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
