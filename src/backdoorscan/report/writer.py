"""Write reports so that an interrupted run leaves nothing half-written: files appear only when complete.

The supervisor writes a confined child's files through this module (`write_tree`, `write_markdown`), so what needs
torch (the images, the trigger file) is imported by the two report writers only."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import ScanError
from ..core.jsonout import dumps
from ..loading.labels import file_slug
from ..safety.paths import ensure_outside


def _file_mode(path: Path) -> int:
    """An existing file's mode, else what a plain `open` would give (0666 less the umask), not mkstemp's 0600."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temporary file in the same folder and an atomic rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file in the same folder and an atomic rename (the file's mode kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_step_summary(path: Path) -> bool:
    """Whether `path` is the job's `$GITHUB_STEP_SUMMARY` (whatever its name: a runner's has no suffix)."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    return summary is not None and summary != "" and Path(summary).resolve() == Path(path).resolve()


def write_markdown(path: Path, text: str) -> None:
    """A Markdown summary: appended when it is the job's `$GITHUB_STEP_SUMMARY` (GitHub collects each step's
    additions, and earlier steps' summaries stay), else written atomically."""
    if is_step_summary(path):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(("\n" if fh.tell() else "") + text)
        return
    write_text_atomic(Path(path), text)


@contextlib.contextmanager
def atomic_output_dir(out: Path, last: str) -> Iterator[Path]:
    """Yield a staging folder inside `out`; on success move its files into `out`, `last` (the report) last.

    Staging inside `out` keeps every write below the one folder a sandboxed scan may write.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ScanError("--out exists and is not a folder", path=out, hint="choose another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    except OSError as exc:
        raise ScanError(f"cannot write there ({exc.strerror})", path=out, hint="choose a writable folder") from exc
    try:
        yield stage
        names = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
        for rel in sorted(names, key=lambda r: r.as_posix() == last):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_tree(folder: Path) -> dict[str, bytes]:
    """A folder's regular files (relative name -> bytes), bounded (`safety.files.read_tree_bounded`): a child's
    report folder or a cache entry, never trusted for its size, links or names."""
    from ..safety.files import read_tree_bounded

    return read_tree_bounded(Path(folder))


def write_tree(folder: Path, files: dict[str, bytes]) -> None:
    """Write `read_tree`'s files below a folder; a name that would leave it (absolute, `..`) is refused."""
    from ..safety.files import plain_relative

    for rel in files:
        if not plain_relative(rel):
            raise ScanError(f"refused: a report file named {rel[:80]!r}", path=folder)
    for rel, data in files.items():
        (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / rel).write_bytes(data)


def write_scan_report(scan, out: Path) -> Path:
    """report.json, report.md, triggers.png, per-class trigger/mask/stamped PNGs and, when the scan names a
    backdoor, triggers.safetensors (every named trigger, for the screen's erasure rule) under `out`."""
    from .images import to_image, trigger_grid, visible_perturbation
    from .markdown import scan_markdown
    from .trigger_file import save_triggers

    ensure_outside(out, scan.data.get("path"))
    with atomic_output_dir(out, "report.json") as stage:
        tiles, labels = [], []
        for i, c in enumerate(scan.classes):  # rows of the trigger tensors follow `classes`
            t = f"{c.cls}_{file_slug(c.name)}" if c.name and file_slug(c.name) else str(c.cls)
            vis = visible_perturbation(scan.triggers[i], scan.masks[i], scan.form)
            to_image(vis).save(stage / f"trigger_{t}.png")
            to_image(scan.masks[i].mean(0, keepdim=True)).save(stage / f"mask_{t}.png")
            to_image(scan.stamped[i]).save(stage / f"stamped_{t}.png")
            tiles.append(vis)
            labels.append(f"{c.cls} L1={c.l1_norm:.1f}")
        families = getattr(scan, "families", None)
        for stem, image in families.images.items() if families is not None else ():  # warps, found pairs
            to_image(image).save(stage / f"{stem}.png")
        if tiles:  # an inconclusive scan that stopped before its search has no triggers
            trigger_grid(tiles, labels, [c.flagged for c in scan.classes]).save(stage / "triggers.png")
        found = scan.found_triggers()  # what `filter --method erase --triggers` reads; only when a backdoor is named
        if found is not None:
            save_triggers(stage / "triggers.safetensors", found)
        (stage / "report.md").write_text(scan_markdown(scan))
        (stage / "report.json").write_text(dumps(scan.to_dict()) + "\n")
    return out / "report.json"


def write_filter_report(result, out: Path) -> Path:
    """manifest.csv, manifest.json (with the per-class summary), summary.md, uap.png and uap.safetensors under `out`.

    uap.safetensors is the file `--save-uap` writes (with the model's sha256 in its metadata): `--uap` reads it.
    """
    import csv

    from .images import to_image
    from .markdown import filter_markdown
    from .uap_file import UapFile, save_uap

    ensure_outside(out, result.input)
    with atomic_output_dir(out, "manifest.json") as stage:
        with open(stage / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label", "prediction", "prediction_perturbed", "score", "flagged"])
            for i in result.items:
                writer.writerow(
                    [
                        i.id,
                        "" if i.label is None else i.label,
                        i.prediction,
                        "" if i.prediction_perturbed is None else i.prediction_perturbed,
                        "" if i.score is None else f"{i.score:.6f}",
                        int(i.flagged),
                    ]
                )
        (stage / "summary.md").write_text(filter_markdown(result))
        if result.rule is not None:
            v = result.rule.v
            to_image(0.5 + 0.5 * v / max(float(v.abs().max()), 1e-8)).save(stage / "uap.png")
            save_uap(
                stage / "uap.safetensors",
                UapFile(
                    v=result.rule.v,
                    thresholds=result.rule.thresholds,
                    class_v=result.rule.class_v,
                    epsilon=result.epsilon,
                    fooling_rate=result.fooling_rate,
                    model_sha256=result.model.get("sha256"),
                    survival=result.survival,
                ),
            )
        (stage / "manifest.json").write_text(dumps(result.to_dict()) + "\n")
    return out / "manifest.json"
