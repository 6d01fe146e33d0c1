"""Many models in one command (`backdoorscan model a.pt2 b.onnx models/*` or `--manifest fleet.toml`).

| module | holds |
|---|---|
| `plan.py` | which models: paths, folders, globs and a TOML manifest -> `FleetEntry` list |
| `run.py` | one sandboxed `backdoorscan model` child per model, killed at `--timeout`; results summed up |
| `cache.py` | `ResultCache`: reports keyed by model, data, settings and version digests |
| `ray.py` | the same children on a Ray cluster (extra `ray`) |
"""
