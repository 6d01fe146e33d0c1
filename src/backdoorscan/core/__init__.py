"""What every layer shares, and nothing else: no torch model is loaded or run here.

| module | holds |
|---|---|
| `settings.py` | `ScanSettings` / `FilterSettings`: every knob's one default, its CLI help, its check |
| `choices.py` | the `Literal` choice lists (forms, norms, solvers, families, sandbox modes) and `check_choice` |
| `errors.py` | `ScanError`, `Inconclusive` and `ExitCode` (0 clean, 1 backdoor, 2 could not scan, 3 inconclusive) |
| `escape.py` | text from a file made printable for a terminal, Markdown and CI logs |
| `jsonout.py` | standard JSON for every report and `--json` line (non-finite numbers as null) |
| `device.py` | `--device` resolved to a torch device |
| `digest.py` | sha256 of files and folders (cache keys, report identity) |
| `seeding.py` | `seeded`: a scan's randomness without touching the caller's RNG |
"""
