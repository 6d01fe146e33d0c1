"""A killed run (reliability): a supervisor stopped by SIGTERM (a cancelled CI job) kills its scanning child, removes
its scratch folder and exits 2 with one line; one killed by SIGKILL still takes its child with it (the kernel's
parent-death signal), so no scan of a hostile model ever runs on unsupervised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backdoorscan.safety.confine import CHILD_ENV, children
from backdoorscan.safety.sandbox import landlock_abi

from ..conftest import CLEAN, MNIST_TEST

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(landlock_abi() < 1, reason="the scan runs in a child only where Landlock is available"),
]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def _is_scan(pid: int) -> bool:
    """Whether the process is the supervisor's scanning child: started with the child's environment (a helper a
    library runs during imports, such as `ldconfig -p` from `ctypes.util.find_library`, is not, even in the
    instant between its fork and its exec, when it still shows the supervisor's command line)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(entry.startswith(CHILD_ENV.encode() + b"=") for entry in environ)


def _start_scan(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A default scan under its supervisor; returns the supervisor and its scanning child once the child runs."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "backdoorscan", "model", str(CLEAN), "--data", str(MNIST_TEST)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "out"), "--threads", "1", "--quiet"],  # quiet: no write ends an orphan
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        # the scanning child, not a helper a library may start while the supervisor still imports (before its
        # signal handlers are in place: a SIGTERM then ends it with -15, and there is no child to clean up)
        started = [pid for pid in children(proc.pid) if _is_scan(pid)]
        if started:
            time.sleep(1.0)  # the child is past its start-up, into the scan
            return proc, min(started)
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no scanning child started: {proc.communicate()[0].decode()[-500:]}")


def _gone(pid: int, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_sigterm_kills_the_child_removes_the_scratch_folder_and_exits_2(tmp_path):
    proc, child = _start_scan(tmp_path)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 2, output
    assert "stopped by SIGTERM; no report was written" in output
    assert "Traceback" not in output
    assert _gone(child)
    assert not list((tmp_path / "tmp").iterdir()), "the scratch folder was left behind"
    assert not (tmp_path / "out").exists()


def test_a_supervisor_killed_outright_takes_its_child_with_it(tmp_path):
    proc, child = _start_scan(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    try:
        assert _gone(child), "the scanning child outlived its supervisor"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
