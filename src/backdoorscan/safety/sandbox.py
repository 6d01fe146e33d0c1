"""Defence in depth on Linux: the process that executes a model may write only its output folders, no network.

Landlock (Linux 5.13+, unprivileged) restricts the calling process and its future children, irreversibly: the
whole filesystem stays readable, writes are allowed only below the given folders (and to /dev/null), and on
kernels with Landlock ABI 4+ TCP bind and connect are refused. Where Landlock is missing, `apply` says so and the
caller decides (the CLI's `--sandbox auto` then runs without it; `--sandbox on` refuses to scan).
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}  # create_ruleset, add_rule, restrict_self
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
# Filesystem access rights (ABI 1..5), from linux/landlock.h.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
READ_ONLY = EXECUTE | READ_FILE | READ_DIR
WRITE_ALL = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class SandboxResult:
    """What was enforced: Landlock ABI, writable folders, whether TCP is blocked; `reason` when nothing was."""

    enforced: bool
    abi: int
    writable: tuple[str, ...]
    network_blocked: bool
    reason: str = ""

    def describe(self) -> str:
        if not self.enforced:
            return f"sandbox off: {self.reason}"
        net = "TCP blocked" if self.network_blocked else "network not restricted (Landlock ABI < 4)"
        return f"sandbox: Landlock ABI {self.abi}, writes only to {len(self.writable)} folder(s), {net}"


def _libc():
    return ctypes.CDLL(None, use_errno=True)  # this process's symbols; find_library would run ldconfig


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is unavailable."""
    nums = _SYSCALLS.get(platform.machine())
    if platform.system() != "Linux" or nums is None:
        return 0
    try:
        abi = _libc().syscall(nums[0], None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def apply(writable: list[str | Path]) -> SandboxResult:
    """Restrict this process for good: read everything, write only below `writable`, no TCP (ABI 4+)."""
    abi = landlock_abi()
    if abi < 1:
        return SandboxResult(False, 0, (), False, "Landlock is not available on this kernel")
    libc = _libc()
    create, add_rule, restrict = _SYSCALLS[platform.machine()]
    handled = _fs_rights(abi)
    attr = _RulesetAttr(
        handled,
        (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
        (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return SandboxResult(
            False, abi, (), False, f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
        )
    folders: list[str] = []
    try:
        rules = [("/", READ_ONLY)]
        rules += [(str(Path(p).resolve()), handled) for p in writable]
        rules += [("/dev/null", READ_FILE | WRITE_FILE)]
        rules += [
            (str(p), READ_FILE | WRITE_FILE | (IOCTL_DEV if abi >= 5 else 0)) for p in Path("/dev").glob("nvidia*")
        ]  # a GPU's device files
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                is_dir = os.path.isdir(path)
                allowed = (
                    rights & handled
                    if is_dir
                    else rights & handled & (READ_FILE | WRITE_FILE | EXECUTE | TRUNCATE | IOCTL_DEV)
                )
                rule = _PathBeneathAttr(allowed, fd)
                if (
                    libc.syscall(
                        add_rule,
                        ctypes.c_int(ruleset),
                        ctypes.c_int(_RULE_PATH_BENEATH),
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    )
                    < 0
                ):
                    return SandboxResult(
                        False, abi, (), False, f"landlock_add_rule({path}) failed: {os.strerror(ctypes.get_errno())}"
                    )
                if rights == handled:
                    folders.append(path)
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return SandboxResult(False, abi, (), False, "prctl(NO_NEW_PRIVS) failed")
        if libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            return SandboxResult(
                False, abi, (), False, f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
            )
    finally:
        os.close(ruleset)
    return SandboxResult(True, abi, tuple(folders), abi >= 4)
