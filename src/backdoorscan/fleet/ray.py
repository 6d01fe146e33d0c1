"""Fleet scans on a Ray cluster: one task per model, each scanning in its own sandboxed child on a worker.

`--ray ADDRESS` joins an existing cluster (`auto`: the cluster this machine belongs to, as Ray understands it);
`--ray local` starts a throwaway local instance. A task asks for one GPU when the cluster has GPUs (the child's
`--device auto` then finds the one Ray assigned through CUDA_VISIBLE_DEVICES) and `--threads` CPUs otherwise.
The report files travel back to the driver as bytes, so workers need the model and sample paths (shared
storage) and backdoorscan installed, but no shared output folder.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..core.errors import ScanError
from .run import Done, Outcome, Runner, run_child

EXTRA = "ray"


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ScanError("--ray needs Ray, which is not installed", hint=f"pip install 'backdoorscan[{EXTRA}]'") from exc
    return ray


def ray_runner(address: str, sandbox: str, timeout: float, threads: int | None) -> tuple[Runner, str]:
    """A runner that spreads the child scans over a Ray cluster, and a description of that cluster."""
    ray = _ray()
    try:
        if address == "local":
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=False,
            )
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    except Exception as exc:
        raise ScanError(
            f"cannot join the Ray cluster at {address!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:140] if str(exc) else ''})",
            hint="start one with `ray start --head`, or use --ray local",
        ) from exc
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, threads or 1)
    task = ray.remote(num_cpus=cpus, num_gpus=1 if gpus else 0, max_retries=0)(run_child)
    where = (
        f"Ray {'local instance' if address == 'local' else address}: {int(resources.get('CPU', 0))} CPUs, "
        f"{gpus} GPUs; one task per model with {'1 GPU' if gpus else f'{cpus} CPU'}"
    )

    def run(jobs: list[list[str]], done: Done) -> None:
        try:
            index = {task.remote(argv, sandbox, timeout): i for i, argv in enumerate(jobs)}
            pending = list(index)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    outcome = ray.get(ready[0])
                except Exception as exc:  # a lost worker is one model not scanned, not a stopped fleet
                    outcome = Outcome(2, "", f"the Ray task failed: {type(exc).__name__}", {}, 0.0)
                done(index[ready[0]], outcome)
        finally:
            if address == "local":
                ray.shutdown()

    return run, where
