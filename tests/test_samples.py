"""Clean-sample loading: folders and .npz give the same tensors; draws are balanced, seeded and streamed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backdoorscan.loading import iter_images, load_samples, open_source, to_model_format

from .conftest import DATA, MNIST_TEST


def test_folder_and_npz_give_the_same_tensors(tmp_path):
    d = np.load(MNIST_TEST)
    x, y = d["x"][:60], d["y"][:60]
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img[..., 0]).save(tmp_path / str(label) / f"{i:04d}.png")
    np.savez(tmp_path / "subset.npz", x=x, y=y)
    from_folder = load_samples(tmp_path, (1, 28, 28), n=60, seed=0)
    from_npz = load_samples(tmp_path / "subset.npz", (1, 28, 28), n=60, seed=0)
    assert from_folder.labels_from == "folders" and from_npz.labels_from == "file"
    order_f = torch.argsort(from_folder.x.flatten(1).sum(1) * 100 + from_folder.y)
    order_n = torch.argsort(from_npz.x.flatten(1).sum(1) * 100 + from_npz.y)
    assert torch.equal(from_folder.x[order_f], from_npz.x[order_n])
    assert torch.equal(from_folder.y[order_f], from_npz.y[order_n])


def test_draw_is_class_balanced_and_seeded():
    a = load_samples(MNIST_TEST, (1, 28, 28), n=300, seed=1)
    b = load_samples(MNIST_TEST, (1, 28, 28), n=300, seed=1)
    c = load_samples(MNIST_TEST, (1, 28, 28), n=300, seed=2)
    assert a.x.shape == (300, 1, 28, 28) and a.x.min() >= 0 and a.x.max() <= 1
    assert torch.bincount(a.y, minlength=10).tolist() == [30] * 10
    assert a.ids == b.ids and a.ids != c.ids


def test_unlabelled_folder_is_balanced_by_predictions(tmp_path):
    d = np.load(MNIST_TEST)
    for i in range(100):
        Image.fromarray(d["x"][i, ..., 0]).save(tmp_path / f"{i}.png")
    s = load_samples(tmp_path, (1, 28, 28), n=20, seed=0, predict=lambda x: torch.arange(len(x)) % 4)
    assert s.labels_from == "predictions" and len(s.ids) == 20
    assert torch.bincount(s.y).tolist() == [5, 5, 5, 5]


def test_npz_streaming_matches_a_full_read():
    source = open_source(MNIST_TEST)
    streamed = torch.cat([b.x for b in iter_images(source, (1, 28, 28), chunk=333)])
    full = to_model_format(np.load(MNIST_TEST)["x"], (1, 28, 28))
    assert torch.equal(streamed, full)


def test_channel_and_size_conversion():
    rgb = np.stack([np.full((40, 40), 255, np.uint8), np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)], -1)
    gray = to_model_format(rgb[None], (1, 28, 28))
    assert gray.shape == (1, 1, 28, 28) and abs(float(gray.mean()) - 0.299) < 1e-3
    assert to_model_format(np.zeros((2, 28, 28, 1), np.uint8), (3, 32, 32)).shape == (2, 3, 32, 32)


def test_cifar_image_folder_reads_class_names():
    s = load_samples(DATA / "cifar10", (3, 32, 32), n=50, seed=0)
    assert s.class_names[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(s.y, minlength=10).tolist() == [5] * 10


def test_samples_of_another_size_are_resized_and_the_report_says_so(tmp_path):
    """Digits stored at 32x32 are brought to a 28x28 model bilinearly; digits at 28x28 are left alone."""
    d = np.load(MNIST_TEST)
    x = torch.from_numpy(d["x"][:200]).float().reshape(200, 28, 28, -1).permute(0, 3, 1, 2)
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear").round().clamp(0, 255).byte()
    np.savez(tmp_path / "d32.npz", x=big.permute(0, 2, 3, 1).numpy(), y=d["y"][:200])
    resized = load_samples(tmp_path / "d32.npz", (1, 28, 28), n=50, seed=0)
    assert resized.x.shape == (50, 1, 28, 28) and resized.resized_from == (32, 32)
    assert "from 32x32" in resized.resize_note and "to 28x28" in resized.resize_note
    same = load_samples(MNIST_TEST, (1, 28, 28), n=50, seed=0)
    assert same.resized_from is None and same.resize_note is None
    # the round trip 28 -> 32 -> 28 keeps the digits: close to the same rows read at their own size
    original = to_model_format(d["x"][[int(i) for i in resized.ids]], (1, 28, 28))
    assert (resized.x - original).abs().mean() < 0.05


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header then declares another size (a decompression bomb's first bytes)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def test_odd_images_in_a_data_folder_are_read_or_skipped_and_listed(tmp_path):
    """Modes nobody planned for (16-bit, CMYK, RGBA 1x1) are read; a file declaring 900 million pixels (Pillow's
    decompression-bomb error) and a truncated one are skipped and named, and the scan goes on with the rest."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "a/gray.png")
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(tmp_path / "a/sixteen.png")
    (tmp_path / "a/bomb.png").write_bytes(_png_declaring(30000, 30000))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("CMYK").save(tmp_path / "b/cmyk.jpg")
    Image.fromarray(np.zeros((1, 1, 4), np.uint8)).save(tmp_path / "b/rgba.png")
    (tmp_path / "b/truncated.png").write_bytes(_png_declaring(8, 8)[:30])
    samples = load_samples(tmp_path, (1, 8, 8), n=10, seed=0)
    assert sorted(samples.skipped) == ["a/bomb.png", "b/truncated.png"]
    assert len(samples.x) == 4 and samples.y.tolist() == [0, 0, 1, 1]
    assert torch.isfinite(samples.x).all() and samples.x.min() >= 0 and samples.x.max() <= 1


def test_an_image_pillow_only_warns_about_is_skipped_before_decoding(tmp_path, monkeypatch):
    """Between Pillow's decompression-bomb limit and twice it Pillow decodes with a warning; the reader skips such
    a file unread (the limit lowered here so that a 40 x 40 image stands for a 100-megapixel one)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "a/big.png")  # 1,600 px: warned, not refused
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "a/small.png")
    samples = load_samples(tmp_path, (1, 8, 8), n=10, seed=0)
    assert samples.skipped == ["a/big.png"]
    assert samples.ids == ["a/small.png"]


def test_top_up_reads_more_of_a_class_the_model_seldom_predicts(tmp_path):
    """A model that calls a digit 3 only when it is very bright: the balanced draw of 40 holds few such 3s; the
    top-up reads other images of the file, none already drawn, until the class has `need`, each labelled by the
    model; nothing is read when no class is short, and the same seed reads the same images."""
    from backdoorscan.loading.samples import top_up

    d = np.load(MNIST_TEST)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.flatten(1).mean(1) > 0.18, 3, 0)  # class 3: the brightest digits, about 8 %

    drawn = load_samples(MNIST_TEST, (1, 28, 28), n=40, seed=0)
    pred = predict(drawn.x)
    have = int((pred == 3).sum())
    assert have < 6
    extra = top_up(open_source(MNIST_TEST), (1, 28, 28), drawn, pred, k=4, need=6, seed=0, predict=predict)
    assert extra is not None and extra.y is not None
    assert extra.y.tolist() == [3] * (6 - have)  # only the short class that exists; classes 1 and 2 are never predicted
    assert not set(extra.ids) & set(drawn.ids) and torch.equal(predict(extra.x), extra.y)
    rows = [int(i) for i in extra.ids]
    assert torch.equal(extra.x, to_model_format(d["x"][rows], (1, 28, 28)))
    again = top_up(open_source(MNIST_TEST), (1, 28, 28), drawn, pred, k=4, need=6, seed=0, predict=predict)
    assert again is not None and again.ids == extra.ids
    common = torch.tensor([0, 3] * 20)  # every class the model predicts, predicted often enough
    assert top_up(open_source(MNIST_TEST), (1, 28, 28), drawn, common, k=2, need=6, seed=0, predict=predict) is None
    # a draw too small for the classes (fewer than `need` a class on average) is not topped up: the scan asks for more
    assert top_up(open_source(MNIST_TEST), (1, 28, 28), drawn, pred, k=8, need=6, seed=0, predict=predict) is None
