"""The scan's detector families beyond USB's one universal trigger per target (issue 25), one module each.

| module | family | what it inverts |
|---|---|---|
| `pairs.py` | source-specific and all-to-all | a small blended patch per ordered pair (s -> t), on s's samples |
| `warp.py` | warping (WaNet) | a smooth universal warp field per target class, applied with `grid_sample` |
| `families.py` | all | one verdict over USB's universal triggers, the pairs and the warps, with its margin |

USB's own stages (Alg. 1 `perturb/uap.py`, Alg. 2 `refine.py`, staging, the decision `decide.py`) still sit at
the package root; they move here as the pipeline becomes folders (issue 24). A new family is a new module here,
named in `ScanSettings.covers` and `report/rows.FAMILY_NAMES`, and run by `scan._other_families`.
"""
