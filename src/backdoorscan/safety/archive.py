"""Inspect a model archive (a zip: `.pt2`, TorchScript, `torch.save`) before any torch loader opens it.

Refused, naming the member: absolute or `..` names, duplicate names (compared case-insensitively, as torch's
zip reader looks members up: otherwise the inspection reads one twin and torch the other), encrypted members,
declared sizes beyond the memory bound or compression ratios above the ratio bound (zip bombs), AOTInductor
payloads and native code, pickle streams that import anything outside torch's weights-only allowlist, `.pt2`
members that torch would unpickle without that allowlist (opaque and custom objects), symbolic-shape expressions
that are not plain arithmetic (torch parses them with `sympy.sympify`, which evaluates Python), and TorchScript
code that runs at load (`__setstate__`). Members are matched to their roles without case, as torch finds them.
"""

from __future__ import annotations

import ast
import io
import json
import pickletools
import posixpath
import re
import zipfile
from pathlib import Path

from ..core.errors import ScanError
from .pickles import PickleFormatError, disallowed_globals

MIB = 1 << 20
NATIVE_SUFFIXES = (
    ".so",
    ".dll",
    ".dylib",
    ".pyd",
    ".o",
    ".a",
    ".cubin",
    ".ptx",
    ".fatbin",
    ".hsaco",
    ".cpp",
    ".c",
    ".h",
    ".hpp",
    ".cu",
    ".spv",
    ".exe",
)
ZIP_MAGIC = b"PK\x03\x04"
# What a symbolic-shape expression may contain: symbols (s0, u1, Symbol('s0', integer=True)), numbers, operators
# and torch's sympy functions; no attribute access, no quotes beyond a symbol's name, no other names.
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<str>'[A-Za-z0-9_]{1,32}')|(?P<op>\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~=]))"
)
_EXPR_FUNCTIONS = frozenset(
    {
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "OpaqueUnaryFn_sqrt",
        "BitwiseFn_bitwise_and",
        "BitwiseFn_bitwise_or",
        "BitwiseFn_bitwise_xor",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Integer",
        "Float",
        "Rational",
        "Pow",
        "Mul",
        "Add",
        "floor",
        "ceiling",
        "sqrt",
        "Piecewise",
        "ITE",
        "Identity",
        "Symbol",
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "zero",
        "rational",
        "even",
        "odd",
        "commutative",
    }
)
_SYMBOL = re.compile(r"^[a-z]{1,8}\d+$")


def _refuse(path: Path, reason: str) -> ScanError:
    return ScanError(
        f"refused: {reason}", path=path, hint="the file is refused before any loader reads it; see docs/security.md"
    )


def check_member_name(name: str) -> str | None:
    """Why a member name is unsafe to extract or look up, or None."""
    if not name or "\x00" in name or "\\" in name:
        return "an empty or malformed name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a '..' path component"
    if posixpath.normpath(name).startswith(".."):
        return "a path outside the archive"
    return None


def open_checked(
    path: Path, data: bytes | None, *, max_bytes: int, max_ratio: float, where: str = ""
) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """Open a zip (from a path or bytes) and check names, sizes and ratios of every member."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data) if data is not None else path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ScanError(
            f"damaged zip archive{where} ({str(exc)[:80]})", path=path, hint="download the file again"
        ) from exc
    infos = zf.infolist()
    seen: set[str] = set()  # case-folded: torch's zip reader (miniz) looks records up case-insensitively
    total = 0
    for info in infos:
        label = repr(info.filename[:120])
        reason = check_member_name(info.filename)
        if reason:
            zf.close()
            raise _refuse(path, f"archive member {label}{where} has {reason}")
        if info.filename.casefold() in seen:
            zf.close()
            raise _refuse(
                path,
                f"archive member {label}{where} appears twice (names compared without case, as torch's reader does)",
            )
        seen.add(info.filename.casefold())
        if info.flag_bits & 0x1:
            zf.close()
            raise _refuse(path, f"archive member {label}{where} is encrypted")
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > MIB and ratio > max_ratio:
            zf.close()
            raise _refuse(
                path,
                f"archive member {label}{where} inflates {ratio:.0f}x "
                f"({info.file_size / MIB:.0f} MiB from {info.compress_size / MIB:.1f} MiB), "
                f"above the bound of {max_ratio:g}x (a zip bomb)",
            )
    if total > max_bytes:
        zf.close()
        raise _refuse(
            path,
            f"the archive{where} declares {total / MIB:.0f} MiB, more than the memory bound "
            f"of {max_bytes / MIB:.0f} MiB (--max-memory)",
        )
    return zf, infos


def _check_pickle(path: Path, data: bytes, member: str, *, torchscript: bool = False) -> None:
    try:
        bad = disallowed_globals(data, torchscript=torchscript)
    except PickleFormatError as exc:
        raise _refuse(path, f"pickle {member!r} is malformed ({exc})") from exc
    if bad:
        shown = ", ".join(bad[:6]) + (", ..." if len(bad) > 6 else "")
        raise ScanError(
            f"refused: pickle {member!r} would import {shown}",
            path=path,
            hint="only tensors and plain containers are loaded; a pickle that imports other objects "
            "can run any code (--unsafe-allow-pickle loads whole-module pickles you trust)",
        )


def check_torch_save(
    path: Path, data: bytes | None, *, max_bytes: int, max_ratio: float, parent: str = "", pickles: bool = True
) -> None:
    """A `torch.save` archive, or one nested in member `parent`: every `.pkl` member within the allowlist."""
    where = f" in {parent}" if parent else ""
    zf, infos = open_checked(path, data, max_bytes=max_bytes, max_ratio=max_ratio, where=where)
    with zf:
        for info in infos:
            if pickles and info.filename.endswith(".pkl"):
                _check_pickle(path, zf.read(info), f"{parent}/{info.filename}" if parent else info.filename)


def check_raw_pickle(path: Path, data: bytes) -> None:
    """A pickle outside a zip (legacy torch.save writes several in a row): every one within the allowlist."""
    stream = io.BytesIO(data)
    first = True
    while stream.tell() < len(data):
        start = stream.tell()
        try:
            for op, _, _ in pickletools.genops(stream):
                if op.name == "STOP":
                    break
        except Exception:
            if first:
                raise _refuse(path, "the pickle is malformed") from None
            break  # legacy files end in raw storage bytes
        _check_pickle(path, data[start : stream.tell()], "pickle")
        first = False


def _nested(path: Path, payload: bytes, member: str, max_bytes: int, max_ratio: float) -> None:
    """A member that torch reads with torch.load: a nested torch.save zip or a raw pickle."""
    if payload.startswith(ZIP_MAGIC):
        check_torch_save(path, payload, max_bytes=max_bytes, max_ratio=max_ratio, parent=member)
    else:
        check_raw_pickle(path, payload)


def check_expression(text: str) -> bool:
    """Whether a symbolic-shape expression is plain arithmetic over shape symbols (safe for `sympy.sympify`)."""
    if len(text) > 2000:
        return False
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            return text[pos:].strip() == ""
        name = match.group("name")
        if name is not None and name not in _EXPR_FUNCTIONS and not _SYMBOL.match(name):
            return False
        pos = match.end()
    return True


def _walk_expressions(value: object, depth: int = 0):
    """Every `expr_str` string in a deserialised `.pt2` program."""
    if depth > 200:
        raise ValueError("nesting too deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str" and isinstance(item, str):
                yield item
            else:
                yield from _walk_expressions(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_expressions(item, depth + 1)


def check_pt2(path: Path, max_bytes: int, max_ratio: float) -> None:
    """A `torch.export` archive: no native code, no pickles beyond weights-only, no code in shape expressions."""
    zf, infos = open_checked(path, None, max_bytes=max_bytes, max_ratio=max_ratio)
    with zf:
        names = [i.filename for i in infos]
        for name in names:
            if "/aotinductor/" in f"/{name.lower()}" or name.lower().endswith(NATIVE_SUFFIXES):
                raise _refuse(
                    path,
                    f"archive member {name[:120]!r} is compiled or native code (AOTInductor); "
                    "only exported programs are scanned",
                )
        for name in names:
            low = name.lower()  # torch finds `archive/DATA/...` when it asks for `archive/data/...`
            if "/models/" in f"/{low}" and low.endswith(".json"):
                try:
                    program = json.loads(zf.read(name))
                    bad = next((e for e in _walk_expressions(program) if not check_expression(e)), None)
                except (ValueError, RecursionError) as exc:
                    raise _refuse(path, f"program {name!r} is not valid JSON ({str(exc)[:80]})") from exc
                if bad is not None:
                    raise _refuse(path, f"program {name!r} has a shape expression that is not arithmetic: {bad[:60]!r}")
            elif "/data/sample_inputs/" in f"/{low}":
                _nested(path, zf.read(name), name, max_bytes, max_ratio)
            elif re.search(r"(^|/)data/(weights|constants)/[^/]+_config\.json$", low):
                _check_payload_config(path, zf, name, names, max_bytes, max_ratio)
            elif re.search(r"(^|/)data/(weights|constants)/[^/]+\.pt$", low):  # legacy pickled weights
                _nested(path, zf.read(name), name, max_bytes, max_ratio)


def _check_payload_config(
    path: Path, zf: zipfile.ZipFile, name: str, names: list[str], max_bytes: int, max_ratio: float
) -> None:
    try:
        config = json.loads(zf.read(name)).get("config", {})
        entries = list(config.items())
    except (ValueError, AttributeError) as exc:
        raise _refuse(path, f"payload config {name!r} is not valid JSON") from exc
    folder = name.rsplit("/", 1)[0]
    for fqn, meta in entries:
        if not isinstance(meta, dict):
            raise _refuse(path, f"payload config {name!r} has a malformed entry")
        member_name = str(meta.get("path_name", ""))
        if member_name.lower().startswith(("custom_obj", "opaque_obj")):
            raise _refuse(
                path,
                f"constant {str(fqn)[:80]!r} is an opaque or custom object, which torch would "
                "unpickle without restriction",
            )
        if meta.get("use_pickle"):
            member = next((n for n in names if n.lower() == f"{folder}/{member_name}".lower()), None)
            if member is None:
                raise _refuse(path, f"payload {member_name[:80]!r} named in {name!r} is missing")
            _nested(path, zf.read(member), member, max_bytes, max_ratio)


def check_torchscript(path: Path, max_bytes: int, max_ratio: float) -> None:
    """A TorchScript archive: pickles name only TorchScript classes and tensors; no code runs at load."""
    zf, infos = open_checked(path, None, max_bytes=max_bytes, max_ratio=max_ratio)
    with zf:
        names = [i.filename for i in infos]
        for name in names:
            low = name.lower()
            if low.endswith(NATIVE_SUFFIXES):
                raise _refuse(path, f"archive member {name[:120]!r} is native code")
            if low.endswith((".pkl", ".debug_pkl")):
                _check_pickle(path, zf.read(name), name, torchscript=True)
            elif "/code/" in f"/{low}" and low.endswith(".py"):
                _check_torchscript_code(path, name, zf.read(name))


def _check_torchscript_code(path: Path, name: str, source: bytes) -> None:
    try:
        tree = ast.parse(source.decode("utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(path, f"TorchScript source {name!r} cannot be parsed") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__setstate__":
            raise _refuse(
                path,
                f"TorchScript code in {name!r} defines __setstate__, which runs while the file "
                "loads, before any check of its graph",
            )


def check_archive(path: Path, fmt: str, max_bytes: int, max_ratio: float, allow_pickle: bool = False) -> None:
    """Dispatch on the detected format; non-zip formats (safetensors, ONNX) are checked by their own loaders.

    `allow_pickle` (the user's --unsafe-allow-pickle) skips the global allowlist of `torch.save` files only.
    The caller has already bounded the file's own size.
    """
    if fmt == "torch.export":
        check_pt2(path, max_bytes, max_ratio)
    elif fmt == "torchscript":
        check_torchscript(path, max_bytes, max_ratio)
    elif fmt == "pickle" and zipfile.is_zipfile(path):
        check_torch_save(path, None, max_bytes=max_bytes, max_ratio=max_ratio, pickles=not allow_pickle)
    elif fmt == "pickle" and not allow_pickle:
        check_raw_pickle(path, path.read_bytes())
