"""Safe on hostile files: everything read from a checkpoint is checked before torch sees it, and the scan runs in
a confined child.

| module | holds |
|---|---|
| `archive.py` | zip archives (.pt2, .pt) inspected with torch's own name resolution; members and sizes bounded |
| `pickles.py` | an opcode-level pickle reader: which globals a pickle would import, without running it |
| `graph.py` | operator allowlists for TorchScript, exported programs and ONNX graphs, per overload |
| `names.py` | names from a file are data: node, parameter and buffer names checked or renamed |
| `limits.py` | `Limits` (memory, time, forward timeout), the watchdog, byte sizes |
| `paths.py` | outputs checked before a scan: never inside the inputs, writable |
| `files.py` | reads bounded by bytes read (not `st_size`), regular files only, no link out of a model folder |
| `child.py` | the scanning child: its environment, session and process tree; the layers it applies |
| `confine.py` | namespaces, hard limits, seccomp, subreaper, the environment allowlist |
| `sandbox.py` | Landlock: the child writes only its output folders |
"""
