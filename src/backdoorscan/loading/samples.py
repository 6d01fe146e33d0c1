"""Images in, [0, 1] float tensors out: image folders (flat or class subfolders) and `.npz` files.

Large inputs are streamed in chunks (`iter_images`): a folder is read file by file, an `.npz` member is read
row-block by row-block from its zip entry, so memory does not grow with the dataset.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ScanError, missing_hint
from .extensions import IMAGE_EXTENSIONS


@dataclass
class Batch:
    """A chunk of images converted to the model's channels and size."""

    x: torch.Tensor  # float32 (B, C, H, W) in [0, 1]
    y: torch.Tensor | None  # int64 labels when the source has them
    ids: list[str]  # relative paths or npz row indices


@dataclass
class SampleSet(Batch):
    """The clean samples a scan works from (a class-balanced draw)."""

    source: Path | None = None
    labels_from: str = "none"  # "file", "folders" or "predictions"
    class_names: list[str] | None = None
    resized_from: tuple[int, int] | None = None  # the images' size when it differed from the model's (bilinear)
    requested: int = 0  # samples asked for (--samples)
    available: int = 0  # images in the source
    skipped: list[str] = field(default_factory=list)  # files of the draw that could not be read

    @property
    def resize_note(self) -> str | None:
        """How the samples were brought to the model's size, when they had another (for the report)."""
        if self.resized_from is None:
            return None
        h, w = self.resized_from
        return f"bilinear, antialiased, from {h}x{w} (first image) to {self.x.shape[-2]}x{self.x.shape[-1]}"


def to_model_format(images: np.ndarray | torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8/float images (N, H, W[, C]) -> float32 (N, C, H, W) in [0, 1] at the model's channels and size."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4:
        raise ScanError(f"images must be (N, H, W) or (N, H, W, C), got shape {tuple(x.shape)}")
    if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
        raise ScanError(
            f"images of shape {tuple(x.shape)} look channels-first (N, C, H, W)",
            hint="store them channels-last, (N, H, W, C), e.g. x.transpose(0, 2, 3, 1)",
        )
    x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        low, high = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if low < -1e-3 or high > 1 + 1e-3:  # 0-255 floats would be clipped to white without a word
            raise ScanError(
                f"float images must lie in [0, 1]; these span [{low:g}, {high:g}]",
                hint="store uint8 (0-255) or divide float images by 255",
            )
        x = x.clamp(0, 1)
    c, h, w = shape
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == 3 and c == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != c:
        raise ScanError(f"images have {x.shape[1]} channels, the model takes {c}")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x.contiguous()


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), the `.npz` layout `to_model_format` reads back."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class NpzSource:
    """Rows of an `.npz` (`x` uint8 (N, H, W[, C]), optional `y`), read in blocks without loading `x` whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                if "x.npy" not in names:
                    raise ScanError(
                        "the .npz has no array 'x'",
                        path=path,
                        hint="store images as x: uint8 (N, H, W, C), labels as y",
                    )
                with zf.open("x.npy") as fh:
                    self.shape, _, self.dtype = _read_header(fh)
                    held = zf.getinfo("x.npy").file_size - fh.tell()  # bytes after the header
                self.y, self.classes = None, None
                if "classes.npy" in names:
                    with zf.open("classes.npy") as fh:
                        names_arr = np.lib.format.read_array(fh, allow_pickle=False)
                    self.classes = [str(c) for c in names_arr] if names_arr.dtype.kind == "U" else None
                if "y.npy" in names:
                    with zf.open("y.npy") as fh:
                        self.y = _class_indices(np.lib.format.read_array(fh, allow_pickle=False), path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ScanError(f"cannot read the .npz ({exc})", path=path, hint="check the file") from exc
        if self.dtype.kind not in "buif" or self.dtype.fields is not None:
            raise ScanError(
                f"'x' has dtype {self.dtype}; expected uint8 images (or floats in [0, 1])",
                path=path,
                hint="store x as uint8 (N, H, W, C)",
            )
        if len(self.shape) not in (3, 4) or min(self.shape) == 0:
            raise ScanError(
                f"'x' has shape {self.shape}; expected (N, H, W) or (N, H, W, C), every size above 0", path=path
            )
        if len(self.shape) == 4 and self.shape[3] not in (1, 3, 4) and self.shape[1] in (1, 3, 4):
            raise ScanError(
                f"'x' has shape {self.shape}: channels-first (N, C, H, W); the .npz layout is (N, H, W, C)",
                path=path,
                hint="store x.transpose(0, 2, 3, 1)",
            )
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if self.shape[0] * row_bytes > held:  # before anything is sized by the header's count
            raise ScanError(
                f"'x' declares {self.shape[0]} images but the file holds {held // row_bytes}",
                path=path,
                hint="the file is truncated or its header is wrong: write it again with numpy.savez",
            )
        if self.y is not None and len(self.y) != self.shape[0]:
            raise ScanError(f"'y' has {len(self.y)} labels for {self.shape[0]} images", path=path)

    def __len__(self) -> int:
        return int(self.shape[0])

    def image_size(self) -> tuple[int, int]:
        """Height and width of the images."""
        return int(self.shape[1]), int(self.shape[2])

    def blocks(self, size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, images) in file order; with `rows`, only those rows."""
        with zipfile.ZipFile(self.path) as zf, zf.open("x.npy") as fh:
            shape, fortran, dtype = _read_header(fh)
            if fortran or dtype.hasobject:
                raise ScanError("'x' must be a C-ordered numeric array", path=self.path)
            row_shape, row_bytes = shape[1:], int(np.prod(shape[1:])) * dtype.itemsize
            wanted = None if rows is None else np.zeros(shape[0], bool)
            if wanted is not None:
                wanted[rows] = True
            for start in range(0, shape[0], size):
                n = min(size, shape[0] - start)
                data = fh.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise ScanError("the .npz is truncated", path=self.path, hint="download it again")
                block = np.frombuffer(data, dtype=dtype).reshape(n, *row_shape).copy()
                idx = np.arange(start, start + n)
                if wanted is not None:
                    keep = wanted[start : start + n]
                    if not keep.any():
                        continue
                    block, idx = block[keep], idx[keep]
                yield idx, block


def _class_indices(y: np.ndarray, path: Path) -> np.ndarray:
    """An .npz's labels as int64 class indices: one non-negative whole number a row, or a ScanError."""
    if y.ndim != 1 or y.dtype.kind not in "buif":
        raise ScanError(f"'y' has shape {y.shape} and dtype {y.dtype}; expected one class index a row", path=path)
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ScanError("'y' holds values that are not whole numbers; expected class indices", path=path)
    if len(y) and y.min() < 0:
        raise ScanError(f"'y' holds a negative label ({y.min():g}); expected class indices 0, 1, ...", path=path)
    return y.astype(np.int64)


def _read_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy version {version}")


class FolderSource:
    """Image files below a folder: class subfolders (ImageFolder) give labels, a flat or mixed tree gives none."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():
            self.root, self.files = path.parent, [path]
        else:
            self.root = path
            self.files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ScanError(
                "no images found (PNG, JPEG, BMP, PPM, WebP, TIFF)",
                path=path,
                hint="point to a folder of images, an image file or an .npz",
            )
        rel = [f.relative_to(self.root) for f in self.files]
        self.classes: list[str] | None = None
        self.y = None
        if path.is_dir() and all(len(r.parts) == 2 for r in rel):
            names = sorted({r.parts[0] for r in rel})
            if len(names) > 1:
                to_index = (
                    {n: int(n) for n in names}
                    if all(n.isdigit() for n in names)
                    else {n: i for i, n in enumerate(names)}
                )
                self.classes = names
                self.y = np.array([to_index[r.parts[0]] for r in rel], dtype=np.int64)
        self.ids = [r.as_posix() for r in rel]

    def __len__(self) -> int:
        return len(self.files)

    def image_size(self) -> tuple[int, int] | None:
        """Height and width of the first readable image (None when none can be read)."""
        for i in range(len(self.files)):
            image = self.read(i)
            if image is not None:
                return int(image.shape[0]), int(image.shape[1])
        return None

    def read(self, index: int) -> np.ndarray | None:
        """One image as uint8 (H, W, C), or None when the file cannot be decoded or declares more pixels than
        Pillow's decompression-bomb limit (one such file is skipped and listed, not the end of the scan). Pillow
        only warns between that limit and twice it; such a file is skipped here too, before it is decoded."""
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():  # the size is checked below: Pillow's warning would only be noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(self.files[index])
            with opened:
                if opened.width * opened.height > (Image.MAX_IMAGE_PIXELS or 0) > 0:
                    return None
                im = opened.convert("RGB") if opened.mode not in ("L", "RGB") else opened
                return np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, -1)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            return None


Source = NpzSource | FolderSource  # an opened set of images


def open_source(path: str | Path) -> Source:
    """An .npz file, an image folder, or a single image file."""
    path = Path(path)
    if not path.exists():
        raise ScanError("not found", path=path, hint=missing_hint(path))
    if path.is_file() and zipfile.is_zipfile(path) and path.suffix.lower() != ".webp":
        return NpzSource(path)
    if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ScanError("not an image folder, image file or .npz", path=path)
    return FolderSource(path)


def iter_images(
    source: Source,
    shape: tuple[int, int, int],
    chunk: int = 256,
    rows: np.ndarray | None = None,
    skipped: list[str] | None = None,
) -> Iterator[Batch]:
    """Stream the source in chunks converted to `shape`; unreadable files are skipped and listed in `skipped`."""
    if isinstance(source, NpzSource):
        for idx, block in source.blocks(chunk, rows):
            y = torch.from_numpy(source.y[idx]) if source.y is not None else None
            try:
                x = to_model_format(block, shape)
            except ScanError as exc:
                raise ScanError(exc.message, path=source.path, hint=exc.hint) from exc
            yield Batch(x, y, [str(i) for i in idx])
        return
    order = range(len(source)) if rows is None else sorted(int(r) for r in rows)
    images: list[np.ndarray] = []
    ids: list[str] = []
    labels: list[int] = []

    def flush() -> Batch:
        x = torch.cat([to_model_format(im[None], shape) for im in images])
        y = torch.tensor(labels) if source.y is not None else None
        return Batch(x, y, list(ids))

    for i in order:
        image = source.read(i)
        if image is None:
            if skipped is not None:
                skipped.append(source.ids[i])
            continue
        images.append(image)
        ids.append(source.ids[i])
        if source.y is not None:
            labels.append(int(source.y[i]))
        if len(images) == chunk:
            yield flush()
            images, ids, labels = [], [], []
    if images:
        yield flush()


def balanced_rows(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n row indices spread as evenly as possible over the classes present in `labels`."""
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    taken = {c: 0 for c in classes}
    chosen: list[int] = []
    while len(chosen) < n:
        open_classes = [c for c in classes if taken[c] < len(pools[c])]
        if not open_classes:
            break
        for c in rng.permutation(open_classes):
            if len(chosen) == n:
                break
            chosen.append(int(pools[c][taken[c]]))
            taken[c] += 1
    return np.sort(np.array(chosen, dtype=np.int64))


# How many images beyond the draw a top-up may read, as a multiple of the draw's size: bounded work on a large
# folder, and enough to find a dozen images of a class the model predicts a tenth as often as the others.
TOP_UP_READ = 4


def top_up(
    source: Source,
    shape: tuple[int, int, int],
    drawn: SampleSet,
    predicted: torch.Tensor,
    *,
    k: int,
    need: int,
    seed: int,
    predict: Callable[[torch.Tensor], torch.Tensor],
) -> Batch | None:
    """More clean samples for the classes the model predicts fewer than `need` times in the draw (`predicted`): the
    source's other images, in a seeded order, read until each such class has `need` (or TOP_UP_READ times the draw
    has been read); each returned with the model's prediction as its `y`. None when no class is short or none was
    found, and when the draw itself is too small to hold `need` a class (43 classes at 300 samples: the scan says
    to draw more). The pairs stage fits a patch on `need` samples of a source: a class the model seldom predicts (a
    weak CIFAR-10 model's dogs) would otherwise go unmeasured."""
    if len(drawn.x) < need * k:
        return None
    counts = torch.bincount(predicted.cpu(), minlength=k)
    missing = {c: need - int(counts[c]) for c in range(k) if int(counts[c]) < need}
    if not missing:
        return None
    taken = set(drawn.ids)
    ids = source.ids if not isinstance(source, NpzSource) else None
    order = np.random.default_rng(seed + 1).permutation(len(source))
    rows = np.array([r for r in order if (str(r) if ids is None else ids[r]) not in taken], dtype=np.int64)
    xs, ys, names = [], [], []
    read, budget = 0, TOP_UP_READ * max(len(drawn.x), 1)
    for start in range(0, len(rows), 256):
        if not missing or read >= budget:
            break
        chunk = rows[start : min(start + 256, start + budget - read)]
        read += len(chunk)
        for batch in iter_images(source, shape, rows=chunk):
            pred = predict(batch.x).cpu()
            for i, c in enumerate(pred.tolist()):
                if missing.get(c, 0) > 0:
                    missing[c] -= 1
                    xs.append(batch.x[i])
                    ys.append(c)
                    names.append(batch.ids[i])
            missing = {c: m for c, m in missing.items() if m > 0}
    if not xs:
        return None
    return Batch(torch.stack(xs), torch.tensor(ys), names)


def load_samples(
    data: str | Path | Source,
    shape: tuple[int, int, int],
    *,
    n: int,
    seed: int,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SampleSet:
    """A class-balanced draw of n clean samples: by the file's labels or folders, else by `predict(x)` labels.

    `data` is a path or a source already opened (`open_source`), so that a scan opens its data once.
    """
    source = data if isinstance(data, (NpzSource, FolderSource)) else open_source(data)
    path = source.path
    rng = np.random.default_rng(seed)
    total = len(source)
    if source.y is not None:
        rows, labels_from = balanced_rows(source.y, n, rng), ("file" if isinstance(source, NpzSource) else "folders")
    else:
        rows, labels_from = np.sort(rng.permutation(total)[: min(total, max(n * 4, n))]), "predictions"
    skipped: list[str] = []
    batches = list(iter_images(source, shape, rows=rows, skipped=skipped))
    if not batches:
        drawn = f"{len(skipped)} file{'s' * (len(skipped) != 1)} drawn"
        raise ScanError(
            f"no readable images ({drawn}, none decoded; first: {skipped[0]})" if skipped else "no readable images",
            path=path,
            hint="check that the files are images of at most Pillow's decompression-bomb limit (about 89 Mpx)",
        )
    x = torch.cat([b.x for b in batches])
    ids = [i for b in batches for i in b.ids]
    y = torch.cat([b.y for b in batches if b.y is not None]) if batches[0].y is not None else None
    if y is None and predict is not None:
        pred = predict(x).cpu().numpy()
        keep = balanced_rows(pred, n, rng)
        x, ids, y = x[keep], [ids[i] for i in keep], torch.from_numpy(pred[keep])
    elif y is None:
        x, ids = x[:n], ids[:n]
    size = source.image_size()
    resized = size if size is not None and tuple(size) != tuple(shape[1:]) else None
    return SampleSet(
        x=x,
        y=y,
        ids=ids,
        source=Path(path),
        labels_from=labels_from,
        class_names=source.classes,
        resized_from=resized,
        requested=n,
        available=total,
        skipped=skipped,
    )


def label_key(name: str) -> str:
    """A class name as folders and label lists both spell it: case, spaces, '_' and '-' ignored."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def map_folders_by_name(samples: SampleSet, labels: list[str]) -> str | None:
    """Class folders named after the model's labels (`eight/`, `zero/`) take those labels' indices, not their
    alphabetical rank. Returns a note when the folders are names that do not match the labels (None otherwise)."""
    names = samples.class_names
    if samples.labels_from != "folders" or names is None or samples.y is None or all(n.isdigit() for n in names):
        return None
    index = {label_key(label): i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        return None  # labels that collide once normalised: no safe mapping by name
    wanted = [index.get(label_key(n)) for n in names]
    missing = [n for n, w in zip(names, wanted, strict=True) if w is None]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        return (
            f"{len(missing)} class folder(s) ({shown}) match none of the model's label names; "
            "folders were mapped to classes in alphabetical order"
        )
    lookup = torch.tensor([int(w) for w in wanted if w is not None], dtype=torch.int64)
    samples.y = lookup[samples.y]
    return None
