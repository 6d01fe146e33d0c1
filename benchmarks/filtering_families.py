"""The dataset filter on the families zoo (issue 25, item 6): FRR and BASR after filtering, per family.

    .venv/bin/python benchmarks/filtering_families.py --zoo bench-out/zoo-families

Screening set per model: held-out clean MNIST test digits (rows 2,000-2,999, outside the clean samples), and the
same digits stamped with the model's trigger where the trigger applies and changes the label (a source-specific
patch: the source's digits only; all-to-all: every digit, to its own target; WaNet: every non-target digit). FRR =
clean digits flagged; BASR after filtering = triggered digits that pass the filter and still get the backdoor's
label. Clean models are screened too (FRR only). Resumable: models already in OUT are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab.data import mnist
from backdoorscan import ModelSource, filter_dataset
from backdoorscan.core.device import resolve_device
from backdoorscan.loading import to_uint8_images
from backdoorscan.report.writer import write_text_atomic

from common import BUNDLED_TEST, device_name
from zoo_families import attack_of


def screening_set(record: dict, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The clean digits, then the triggered ones; which rows are triggered; the label each triggered row should get."""
    attack = attack_of(record)
    if attack is None:
        return xs, np.zeros(len(xs), dtype=bool), torch.empty(0, dtype=torch.long)
    expected = attack.expected(ys)
    keep = attack.applies(ys) & (expected != ys)
    triggered = attack.stamp(xs[keep])
    kind = np.r_[np.zeros(len(xs)), np.ones(len(triggered))].astype(bool)
    return torch.cat([xs, triggered]), kind, expected[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="bench-out/zoo-families")
    parser.add_argument("--out", default="docs/results/families_filtering.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo, out = Path(args.zoo), Path(args.out)
    records = json.loads((zoo / "zoo.json").read_text())
    xt, yt, _ = mnist("test")
    xs, ys = xt[2000:3000], yt[2000:3000]
    dev = resolve_device(args.device)
    saved = json.loads(out.read_text()) if out.exists() else {"device": device_name(dev), "models": {}}
    for name, record in records.items():
        if name in saved["models"]:
            continue
        x, kind, expected = screening_set(record, xs, ys)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "screen.npz"
            np.savez(path, x=to_uint8_images(x))
            res = filter_dataset(ModelSource(zoo / record["path"]), str(BUNDLED_TEST), path, device=dev)
        flagged = np.array([i.flagged for i in res.items])
        pred = torch.tensor([i.prediction for i in res.items])
        hit = (pred[torch.from_numpy(kind)] == expected).numpy() if kind.any() else np.zeros(0, dtype=bool)
        saved["models"][name] = {
            "family": record["family"],
            "aside": record["aside"],
            "verdict": res.verdict,
            "frr": round(float(flagged[~kind].mean()), 4),
            "triggered": int(kind.sum()),
            "basr_before": round(float(hit.mean()), 4) if hit.size else None,
            "basr_after": round(float((hit & ~flagged[kind]).mean()), 4) if hit.size else None,
            "epsilon": res.epsilon,
            "seconds": round(time.perf_counter() - t, 1),
        }
        write_text_atomic(out, json.dumps(saved, indent=1) + "\n")
        print(name, json.dumps(saved["models"][name]), flush=True)
    print(table(saved["models"]))


def table(models: dict[str, dict]) -> str:
    """One line per family and part: models, mean FRR, mean BASR before and after (and the worst model's)."""
    lines = [
        "| family | part | models | FRR (max) | BASR before | BASR after filtering (max) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for family in dict.fromkeys(m["family"] for m in models.values()):
        for part, aside in (("main", False), ("aside", True)):
            rs = [m for m in models.values() if m["family"] == family and bool(m["aside"]) == aside]
            if not rs:
                continue
            frr = [m["frr"] for m in rs]
            before = [m["basr_before"] for m in rs if m["basr_before"] is not None]
            after = [m["basr_after"] for m in rs if m["basr_after"] is not None]
            lines.append(
                f"| {family} | {part} | {len(rs)} | {100 * np.mean(frr):.1f}% ({100 * max(frr):.1f}%) | "
                + (f"{100 * np.mean(before):.1f}% | " if before else "- | ")
                + (f"{100 * np.mean(after):.2f}% ({100 * max(after):.1f}%) |" if after else "- |")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
