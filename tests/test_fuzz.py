"""Property-based tests of the parsers that read hostile bytes: each either accepts its input or refuses it with
a ScanError (or its own format error), never another exception, and what it accepts keeps its promise.

Run briefly here (a few seconds each); `docs/security.md` records a longer run (HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import string
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backdoorscan.core.errors import ScanError
from backdoorscan.core.escape import md_code, printable
from backdoorscan.safety.archive import check_expression, check_torch_save, open_checked
from backdoorscan.safety.names import is_plain_name
from backdoorscan.safety.pickles import PickleFormatError, disallowed_globals

settings.register_profile(
    "quick",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.binary(max_size=400))
def test_pickle_reader_on_random_bytes(data):
    with contextlib.suppress(PickleFormatError):
        assert isinstance(disallowed_globals(data), list)


@given(plain_values, st.integers(min_value=0, max_value=5))
def test_pickle_reader_accepts_plain_containers(value, protocol):
    assert disallowed_globals(pickle.dumps(value, protocol=protocol)) == []


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=199), st.binary(min_size=1, max_size=8))
def test_pickle_reader_on_mutated_pickles(data, at, patch):
    base = bytearray(pickle.dumps({"w": [1, 2.5, "x"], "b": (None, True)}, protocol=2))
    at = at % len(base)
    base[at : at + len(patch)] = patch
    with contextlib.suppress(PickleFormatError):
        disallowed_globals(bytes(base))


member_names = st.sampled_from(
    [
        "archive/data.pkl",
        "archive/DATA.pkl",
        "archive/data/0",
        "../x",
        "/abs",
        "a\\b",
        "archive/version",
        "c:/x",
        "",
        "archive/Data.PKL",
    ]
) | st.text(alphabet=string.ascii_letters + "/._-", min_size=1, max_size=20)


@given(st.lists(st.tuples(member_names, st.binary(max_size=64)), max_size=5))
def test_archive_inspection_refuses_or_passes(tmp_path_factory, members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        for name, data in members:
            if name:
                zf.writestr(name, data)
    payload = buf.getvalue()
    path = Path("fuzz.zip")
    try:
        check_torch_save(path, payload, max_bytes=1 << 20, max_ratio=100.0)
    except ScanError:
        return
    zf, infos = open_checked(path, payload, max_bytes=1 << 20, max_ratio=100.0)
    folded = [i.filename.casefold() for i in infos]
    assert len(folded) == len(set(folded)), "case twins passed the inspection"
    assert not any(".." in n.split("/") or n.startswith("/") for n in folded)
    zf.close()


@given(st.text(max_size=80))
def test_shape_grammar_never_admits_code(text):
    if check_expression(text):
        for word in ("__", '"', "lambda", "import", "getattr", "["):
            assert word not in text, text


@given(st.text(max_size=40))
def test_plain_names_cannot_leave_a_string_literal(name):
    if is_plain_name(name):
        assert not set(name) & set("\"'\\\n()[]{} ;")


@given(st.text(max_size=60))
def test_escapes_leave_no_control_characters(text):
    shown = printable(text)
    assert all(ch.isprintable() for ch in shown)
    code = md_code(text)
    fence = code[: len(code) - len(code.lstrip("`"))]
    assert fence not in code[len(fence) : -len(fence)], code  # the content cannot close the span


@given(
    st.lists(st.sampled_from(["", "offset", "length", "location"]), max_size=3),
    st.integers(min_value=-5, max_value=1 << 40),
    st.integers(min_value=-5, max_value=1 << 40),
    st.sampled_from(["w.bin", "../w.bin", "/etc/passwd", "sub/../w.bin", "missing.bin", ""]),
)
def test_onnx_external_data_checks(tmp_path_factory, keys, offset, length, location):
    from onnx import TensorProto

    from backdoorscan.loading.onnx import check_tensor_sizes

    folder = tmp_path_factory.mktemp("onnx")
    (folder / "w.bin").write_bytes(b"\0" * 64)
    proto = _proto_with_external(location, {"offset": str(offset), "length": str(length)}, set(keys))
    try:
        check_tensor_sizes(proto, folder / "m.onnx", max_bytes=1 << 20)
    except ScanError:
        return
    tensor = proto.graph.initializer[0]
    info = {e.key: e.value for e in tensor.external_data}
    off, ln = int(info.get("offset", 0)), int(info.get("length", 40))
    assert tensor.data_location == TensorProto.EXTERNAL
    assert (folder / info["location"]).resolve() == (folder / "w.bin").resolve()
    assert off >= 0 and off + ln <= 64 and ln == 40


def _proto_with_external(location: str, values: dict[str, str], keys: set[str]):
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10])
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, **{k: v for k, v in values.items() if k in keys}}
    for key, value in entries.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    return helper.make_model(graph)


toml_values = st.one_of(
    st.integers(), st.text(max_size=10), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=3)
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["steps", "samples", "seed", "threshold", "norm", "arch", "mean", "data", "name", "lr", "refine"]
        ),
        toml_values,
        max_size=4,
    )
)
def test_manifest_values_are_type_checked(tmp_path_factory, table):
    import json

    from backdoorscan.fleet.plan import read_manifest

    folder = tmp_path_factory.mktemp("manifest")
    lines = ["[[model]]", 'path = "m.pt2"'] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    (folder / "m.toml").write_text("\n".join(lines) + "\n")
    try:
        entries = read_manifest(folder / "m.toml", folder, {}, {})
        for entry in entries:
            entry.check()
    except ScanError:
        pass


@given(st.binary(max_size=300))
def test_labels_reader_on_random_bytes(tmp_path_factory, data):
    from backdoorscan.loading.labels import read_labels

    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_bytes(data)
    try:
        names = read_labels(path)
    except ScanError:
        return
    assert len(names) >= 2 and all(n.isprintable() for n in names)


NPZ_DTYPES = ["uint8", "int8", "uint16", "int64", "float16", "float32", "float64", "bool", "complex64", "<U3"]


@st.composite
def npz_members(draw):
    """The arrays of a user's `--data` .npz, drawn wide: odd dtypes and shapes, labels of any kind, wrong names."""
    members: dict[str, np.ndarray] = {}
    if draw(st.integers(0, 9)):  # usually an x
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=5)))
        dtype = draw(st.sampled_from(NPZ_DTYPES))
        values = np.asarray(draw(st.lists(st.floats(-300, 300), min_size=1, max_size=4)))
        members["x"] = np.resize(values, shape).astype(dtype)
    if draw(st.booleans()):
        n = draw(st.integers(0, 8))
        kind = draw(st.sampled_from(["int64", "int8", "float64", "<U2", "bool", "2d"]))
        raw = np.asarray(draw(st.lists(st.integers(-3, 12), min_size=n, max_size=n)), dtype=np.int64)
        members["y"] = raw.reshape(-1, 1).repeat(2, 1) if kind == "2d" else raw.astype(kind)
        if kind == "float64" and n and draw(st.booleans()):
            members["y"][0] = np.nan
    if draw(st.booleans()):
        members["classes"] = np.array(draw(st.lists(st.text(max_size=3), max_size=4)), dtype="<U3")
    return members


def _lie_about_rows(path: Path, factor: int) -> None:
    """Rewrite x.npy's header to declare `factor` times the rows it holds (a truncated or forged file)."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    raw = members.get("x.npy")
    if raw is None:
        return
    head_len = int.from_bytes(raw[8:10], "little")
    header = raw[10 : 10 + head_len].decode("latin1")
    start = header.find("'shape': (") + len("'shape': (")
    end = header.find(",", start) if header.find(",", start) != -1 else header.find(")", start)
    if start < len("'shape': (") or not header[start:end].strip().isdigit():
        return
    forged = header[:start] + str(int(header[start:end]) * factor) + header[end:]
    forged = forged.rstrip().ljust(head_len - 1) + "\n"
    if len(forged) != head_len:
        return
    members["x.npy"] = raw[:10] + forged.encode("latin1") + raw[10 + head_len :]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@given(npz_members(), st.sampled_from([1, 1, 3, 10**9]), st.sampled_from([(1, 8, 8), (3, 4, 4)]))
def test_samples_reader_on_odd_npz(tmp_path_factory, members, lie, shape):
    """A `--data` .npz loads as images in [0, 1] with labels that are class indices, or is refused with a
    ScanError; never another exception, never an allocation sized by a header that lies."""
    from backdoorscan.loading.samples import load_samples

    path = tmp_path_factory.mktemp("npz") / "data.npz"
    np.savez(path, **members)
    if lie != 1:
        _lie_about_rows(path, lie)
    try:
        samples = load_samples(path, shape, n=6, seed=0)
    except ScanError:
        return
    assert samples.x.dtype == torch.float32 and samples.x.shape[1:] == shape
    assert torch.isfinite(samples.x).all() and samples.x.min() >= 0 and samples.x.max() <= 1
    if samples.y is not None:
        assert samples.y.dtype == torch.int64 and len(samples.y) == len(samples.x)
        assert int(samples.y.min()) >= 0


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=False), st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
HUB_KEYS = ["model_type", "architecture", "id2label", "num_labels", "num_classes", "num_channels", "model_args"]
HUB_KEYS += ["pretrained_cfg", "label_names", "architectures"]
PRE_KEYS = ["size", "crop_size", "do_center_crop", "image_mean", "image_std", "rescale_factor", "do_rescale"]
PRE_KEYS += ["do_normalize", "resample"]


@given(
    st.dictionaries(st.sampled_from(HUB_KEYS), json_values, max_size=6),
    st.sampled_from(["ViT", "vit", None]),
    st.dictionaries(st.sampled_from(PRE_KEYS), json_values, max_size=6),
)
def test_hub_configs_are_read_or_refused(tmp_path_factory, config, model_type, pre):
    """A hub folder's config.json and preprocessor_config.json, with values of any JSON type: read into a folder
    description whose figures are usable (class count, channels, sizes, positive std), or refused with a
    ScanError; never another exception."""
    import json

    from backdoorscan.loading.hub import read_hub_folder

    folder = tmp_path_factory.mktemp("hub")
    if model_type is not None:
        config = {**config, "model_type": model_type}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    (folder / "model.safetensors").write_bytes(b"\x00" * 8)
    try:
        hub = read_hub_folder(folder)
    except ScanError:
        return
    assert isinstance(hub.num_classes, int) and 2 <= hub.num_classes <= 100_000
    assert type(hub.channels) is int and hub.channels in (1, 3)
    assert hub.input_size is None or all(type(s) is int and 1 <= s <= 4096 for s in hub.input_size)
    assert hub.std is None or (len(hub.std) == hub.channels and min(hub.std) > 0)
    assert hub.labels is None or len(hub.labels) == hub.num_classes
    hub.to_dict()


PT2_TEXT_MEMBERS = [
    "mnist_clean/models/model.json",
    "mnist_clean/data/weights/model_weights_config.json",
    "mnist_clean/data/constants/model_constants_config.json",
    "mnist_clean/archive_format",
    "mnist_clean/archive_version",
    "mnist_clean/byteorder",
]


@settings(max_examples=int(os.environ.get("FUZZ_PT2_EXAMPLES", "12")))
@given(
    st.sampled_from(PT2_TEXT_MEMBERS),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
    st.booleans(),
)
def test_mutated_pt2_metadata_loads_or_is_refused(tmp_path_factory, member, edits, truncate):
    """A real `.pt2` whose graph, weight-table or version records have bytes changed or are cut short: torch's
    loader behind the inspection either loads a module or the file is refused with a ScanError (or is
    inconclusive); never a crash with another exception."""
    from backdoorscan.core.errors import Inconclusive
    from backdoorscan.loading import load_model

    from .conftest import CLEAN

    with zipfile.ZipFile(CLEAN) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    data = bytearray(members[member])
    for where, value in edits:
        if data:
            data[int(where * len(data))] = value
    members[member] = bytes(data[: len(data) // 2] if truncate else data)
    path = tmp_path_factory.mktemp("pt2") / "mutated.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    try:
        loaded = load_model(path, device="cpu")
    except (ScanError, Inconclusive):
        return
    with torch.no_grad():
        loaded.module(torch.rand(2, 1, 28, 28))


TENSOR_DTYPES = [torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def stored_tensors(draw, names: tuple[str, ...], side: int):
    """Some of `names`, each of a random dtype, rank 0-4 and small sides (sometimes the model's), values anywhere."""
    out = {}
    for name in names:
        if draw(st.booleans()) and draw(st.booleans()):
            continue  # absent
        rank = draw(st.integers(0, 4))
        shape = [draw(st.sampled_from([0, 1, 2, 3, side])) for _ in range(rank)]
        dtype = draw(st.sampled_from(TENSOR_DTYPES))
        value = draw(st.sampled_from([0.0, 1.0, -1.0, 3.5, 9.0, 1e30, float("nan"), float("inf")]))
        out[name] = torch.full(shape, value).to(dtype) if dtype.is_floating_point else torch.full(shape, 3, dtype=dtype)
        if not dtype.is_floating_point and draw(st.booleans()):
            out[name] = torch.full(shape, draw(st.integers(-5, 12)), dtype=torch.int64)
    return out


@given(stored_tensors(("regions", "targets", "sources", "warps", "warp_targets"), 4), st.text(max_size=30))
def test_triggers_reader_on_odd_tensors(tmp_path_factory, tensors, families):
    """Any dtype, rank or value in a triggers file is read into int classes within the model's, finite regions of
    its size and warp grids, or refused as one ScanError (float classes were once read as 3.5)."""
    from safetensors.torch import save_file

    from backdoorscan.report.trigger_file import TRIGGERS_SCHEMA, load_triggers

    path = tmp_path_factory.mktemp("triggers") / "t.safetensors"
    n = len(tensors["targets"]) if "targets" in tensors and tensors["targets"].ndim == 1 else 1
    names = families if families.startswith("[") else json.dumps(["universal"] * n)  # valid names, or any text
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"schema": TRIGGERS_SCHEMA, "families": names},
    )
    try:
        found = load_triggers(path, None, (4, 4), 10)
    except ScanError:
        return
    assert all(type(c) is int and 0 <= c < 10 for c in found.targets + found.warp_targets)
    assert all(type(s) is int and -1 <= s < 10 for s in found.sources)
    assert tuple(found.regions.shape[1:]) == (1, 4, 4) and bool(torch.isfinite(found.regions).all())
    assert found.warps.ndim == 4 and found.warps.shape[2] >= 2 and bool(torch.isfinite(found.warps).all())


@given(stored_tensors(("uap", "thresholds", "survival", "class_uaps", "class_uap_classes"), 4), st.text(max_size=8))
def test_uap_reader_on_odd_tensors(tmp_path_factory, tensors, epsilon):
    """Any dtype, rank or value in a UAP file is read into a finite UAP of the model's shape with finite thresholds
    and int classes, or refused as one ScanError."""
    from safetensors.torch import save_file

    from backdoorscan.report.uap_file import UAP_SCHEMA, load_uap

    path = tmp_path_factory.mktemp("uap") / "u.safetensors"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"schema": UAP_SCHEMA, "epsilon": epsilon}
    )
    try:
        found = load_uap(path, None, (1, 4, 4))
    except ScanError:
        return
    assert tuple(found.v.shape) == (1, 4, 4) and bool(torch.isfinite(found.v).all())
    assert found.thresholds.ndim == 1 and bool(torch.isfinite(found.thresholds).all())
    assert all(type(c) is int and 0 <= c < len(found.thresholds) for c in found.class_v)
