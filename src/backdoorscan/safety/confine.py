"""The layers around the process that runs a model, beside Landlock (`sandbox.py`); each is reported, none trusted
alone.

- session: a new session, stdio are pipes, so no terminal to type into (`TIOCSTI`) or signal. Any kernel.
- environment: an allowlist of variables, so CI tokens and secrets never reach the child. Any kernel.
- namespaces: new user, network (empty: no TCP, UDP or outside abstract sockets) and IPC namespaces. Needs
  unprivileged user namespaces.
- seccomp: no sockets, new processes or programs, ptrace or /proc memory access, terminal injection, raised
  limits, new namespaces, kernel keys or BPF. Needs seccomp filters (Linux 3.5+, x86_64 or aarch64).
- limits: hard `RLIMIT_AS`/`RLIMIT_DATA` on CPU (shared memory counted), no core files. Any kernel.
- tree: the parent is the subreaper of whatever the child leaves and kills it when the scan ends. Linux 3.4+.

`enter_namespaces` runs first thing in the child, while it is still single-threaded (before torch is imported);
`install_seccomp` and `hard_limits` run after Landlock, before the model file is opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import struct
from dataclasses import dataclass, field

_LIBC = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: no `find_library`, which runs programs

CHILD_ENV = "BACKDOORSCAN_SANDBOX_CHILD"  # set in a sandboxed child: the folders it may write (JSON)
PARENT_ENV = "BACKDOORSCAN_PARENT"  # set in every scanning child: its supervisor's process id

# Variables a scanning child keeps; everything else (tokens, CI secrets, cloud credentials) is dropped.
ENV_KEEP = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "COLUMNS",
        "NO_COLOR",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "PYTHONUTF8",
        "PYTHONIOENCODING",
        "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "NVIDIA_VISIBLE_DEVICES",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "XDG_CACHE_HOME",
        "COVERAGE_PROCESS_START",
    }
)
ENV_KEEP_PREFIXES = ("LC_", "BACKDOORSCAN_", "TORCH_", "CUBLAS_", "CUDNN_")

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWIPC = 0x10000000, 0x40000000, 0x08000000
CLONE_THREAD = 0x00010000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG = 38, 22, 36, 4, 1
SECCOMP_MODE_FILTER = 2
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, EACCES, ENOSYS = 1, 13, 38
TIOCSTI, TIOCLINUX, TIOCCONS = 0x5412, 0x541C, 0x541D
# Syscall numbers per architecture, with the audit architecture seccomp sees.
_ARCH = {
    "x86_64": dict(
        audit=0xC000003E,
        socket=41,
        socketpair=53,
        ptrace=101,
        process_vm_readv=310,
        process_vm_writev=311,
        fork=57,
        vfork=58,
        clone=56,
        clone3=435,
        execve=59,
        execveat=322,
        ioctl=16,
        unshare=272,
        setns=308,
        mount=165,
        bpf=321,
        keyctl=250,
        add_key=248,
        request_key=249,
        setrlimit=160,
        prlimit64=302,
        userfaultfd=323,
        perf_event_open=298,
        kcmp=312,
        pidfd_getfd=438,
        open_by_handle_at=304,
        init_module=175,
        finit_module=313,
    ),
    "aarch64": dict(
        audit=0xC00000B7,
        socket=198,
        socketpair=199,
        ptrace=117,
        process_vm_readv=270,
        process_vm_writev=271,
        clone=220,
        clone3=435,
        execve=221,
        execveat=281,
        ioctl=29,
        unshare=97,
        setns=268,
        mount=40,
        bpf=280,
        keyctl=219,
        add_key=217,
        request_key=218,
        setrlimit=164,
        prlimit64=261,
        userfaultfd=282,
        perf_event_open=241,
        kcmp=272,
        pidfd_getfd=438,
        open_by_handle_at=265,
        init_module=105,
        finit_module=273,
    ),
}
DENIED = (
    "socket",
    "socketpair",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "fork",
    "vfork",
    "execve",
    "execveat",
    "unshare",
    "setns",
    "mount",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "setrlimit",
    "userfaultfd",
    "perf_event_open",
    "kcmp",
    "pidfd_getfd",
    "open_by_handle_at",
    "init_module",
    "finit_module",
)
_X32_BIT = 0x40000000


@dataclass
class Layers:
    """Which confinement layers hold in this process, and why each missing one is missing."""

    applied: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"applied": list(self.applied), "missing": dict(self.missing)}

    def describe(self) -> str:
        text = "sandbox: " + (", ".join(self.applied) or "no layer")
        if self.missing:
            text += "; missing: " + "; ".join(f"{k} ({v})" for k, v in self.missing.items())
        return text


LAYERS = Layers()  # what this process holds; filled in by the child as it confines itself


def scrubbed_environment(extra: dict[str, str]) -> dict[str, str]:
    """The environment a scanning child gets: the allowlist above, then `extra`."""
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP or k.startswith(ENV_KEEP_PREFIXES)}
    env.pop(CHILD_ENV, None)
    env["MALLOC_ARENA_MAX"] = "2"  # fewer glibc arenas: the address-space limit then fits the memory bound
    env.update(extra)
    return env


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_namespaces() -> str | None:
    """New user, network and IPC namespaces for this (still single-threaded) process, the same uid and gid mapped
    inside; None when entered, else why not."""
    if platform.system() != "Linux":
        return "not Linux"
    uid, gid = os.getuid(), os.getgid()
    if _LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC) != 0:
        return f"unshare failed: {os.strerror(ctypes.get_errno())} (user namespaces disabled?)"
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as exc:
        return f"uid map failed: {exc.strerror}"
    return None


def _filter(arch: dict[str, int]) -> bytes:
    """A classic BPF seccomp program: the denied calls fail with an error, everything else is allowed."""
    prog: list[tuple[int, int, int, int]] = []
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06

    def errno(code: int) -> tuple[int, int, int, int]:
        return (ret, 0, 0, RET_ERRNO | code)

    prog += [(ld, 0, 0, 4), (jeq, 1, 0, arch["audit"]), (ret, 0, 0, RET_KILL_PROCESS), (ld, 0, 0, 0)]
    if "fork" in arch:  # x86_64: the x32 ABI's numbers would bypass the checks below
        prog += [(jge, 0, 1, _X32_BIT), errno(EPERM)]
    for name in DENIED:
        if name in arch:
            prog += [(jeq, 0, 1, arch[name]), errno(EACCES if name.startswith("socket") else EPERM)]
    prog += [(jeq, 0, 1, arch["clone3"]), errno(ENOSYS)]  # glibc falls back to clone, checked below
    prog += [
        (jeq, 0, 4, arch["clone"]),
        (ld, 0, 0, 16),
        (jset, 0, 1, CLONE_THREAD),
        (ret, 0, 0, RET_ALLOW),
        errno(EPERM),
    ]  # threads only: no new process
    requests = (TIOCSTI, TIOCLINUX, TIOCCONS)
    prog += [(jeq, 0, 2 * len(requests) + 2, arch["ioctl"]), (ld, 0, 0, 24)]
    for request in requests:
        prog += [(jeq, 0, 1, request), errno(EPERM)]
    prog += [(ret, 0, 0, RET_ALLOW)]
    prog += [
        (jeq, 0, 5, arch["prlimit64"]),
        (ld, 0, 0, 32),
        (jeq, 0, 2, 0),
        (ld, 0, 0, 36),
        (jeq, 1, 0, 0),
        errno(EPERM),
        (ret, 0, 0, RET_ALLOW),
    ]  # reading limits is fine, setting them is not
    prog += [(ret, 0, 0, RET_ALLOW)]
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> str | None:
    """Install the filter on this process and its future threads; None when installed, else why not."""
    arch = _ARCH.get(platform.machine())
    if platform.system() != "Linux" or arch is None:
        return f"no filter for {platform.system()} {platform.machine()}"
    code = _filter(arch)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return "prctl(NO_NEW_PRIVS) failed"
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC) would cover threads started before; none run
    # Python code here, and torch's pools start after, so prctl (this thread, inherited by new ones) suffices.
    if _LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        return f"prctl(SECCOMP) failed: {os.strerror(ctypes.get_errno())}"
    return None


def hard_limits(memory: int | None) -> str | None:
    """Hard limits this process cannot raise again: no core files, and (on CPU, `memory` set) the address space
    and data segment at `memory`; None when set, else why not."""
    try:
        import resource
    except ImportError:
        return "no resource limits on this system"
    pairs = [(resource.RLIMIT_CORE, 0)]
    if memory is not None:
        pairs += [(resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory)]
    for which, value in pairs:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as exc:
            return f"setrlimit failed: {exc}"
    return None


def address_space_bound(memory: int, threads: int) -> int:
    """The address-space limit for a CPU scan bounded at `memory` bytes: the bound, torch's libraries and stacks."""
    return memory + (4 << 30) + threads * (80 << 20)


def die_with_parent() -> None:
    """In a scanning child, first thing: the kernel kills this process (SIGKILL) when its supervisor dies, even by
    SIGKILL, so a cancelled CI job never leaves a scan of a hostile model running unsupervised; a supervisor that
    died before this line leaves the child exiting at once (exit 2)."""
    expected = os.environ.get(PARENT_ENV)
    if expected is None:
        return
    if platform.system() == "Linux":
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != expected:
        os._exit(2)


# The parent side.


def become_subreaper() -> bool:
    """Orphans of the scanning child (a daemonised grandchild) become this process's children, to be killed."""
    return platform.system() == "Linux" and _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children(parent: int | None = None) -> set[int]:
    """Process ids whose parent is `parent` (default: this process), from /proc."""
    me, found = os.getpid() if parent is None else parent, set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read(512)
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 1 and int(fields[1]) == me:
                found.add(int(entry.name))
    return found


def kill_tree(pid: int, before: set[int]) -> int:
    """Kill the child's session and every process adopted since `before`; returns how many were killed."""
    killed = 0
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for other in children() - before - {pid}:
        with contextlib.suppress(OSError):
            os.kill(other, signal.SIGKILL)
            killed += 1
        with contextlib.suppress(OSError):
            os.waitpid(other, 0)
    return killed


@contextlib.contextmanager
def undumpable():
    """While a child scans: this process's /proc files (environ, memory) readable by no one but root of the host."""
    ok = platform.system() == "Linux" and _LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    try:
        yield ok
    finally:
        if ok:
            _LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
