"""`python -m backdoorscan`; a sandboxed scanning child first enters its namespaces, while still single-threaded."""

import os

from .safety.confine import CHILD_ENV

if os.environ.get(CHILD_ENV) is not None:
    from .safety.confine import LAYERS, enter_namespaces

    _problem = enter_namespaces()
    if _problem is None:
        LAYERS.applied.append("namespaces (no network, own IPC, own users)")
    else:
        LAYERS.missing["namespaces"] = _problem
    if os.getsid(0) == os.getpid():
        LAYERS.applied.append("own session, no terminal")
    else:
        LAYERS.missing["session"] = "started outside a session of its own"

from .cli import main  # noqa: E402

main()
