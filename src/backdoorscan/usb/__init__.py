"""The model scan (`backdoorscan model`): USB (Universal Soldier for Backdoor detection) and the families beyond it.

| module | stage | holds |
|---|---|---|
| `pipeline.py` | all | `scan_model`: load -> stage 1 -> Alg. 1 -> Alg. 2 -> other families -> decision |
| `result.py` | all | `ModelScan` and `ClassResult`, the JSON report they make |
| `batching.py` | all | how many classes go through the model at once, from the memory at hand |
| `staging.py` | stage 1 | a cheap Alg. 1 on every class, successive halving: which classes are refined |
| `refine.py` | Alg. 2 | UAP -> small trigger x mask (CE - SSIM + L1), every class a batch row |
| `ssim.py` | Alg. 2 | the SSIM term |
| `decide.py` | decision | anomaly index (MAD), guards, the threshold for K classes, distances from a flip |
| `pairs.py` | family | source-specific and all-to-all: a small patch per ordered pair (s -> t) on s's samples |
| `alltoall.py` | family | all-to-all: one shared patch moving every class, each to its own target |
| `warp.py` | family | warping (WaNet): a smooth universal warp field per target, applied with `grid_sample` |
| `pair_rule.py` | family | the pairs' decision rule: which measured pairs flag, and how far each is from it |
| `families.py` | family | runs the pairs, all-to-all and warp stages: findings, margins, one verdict with USB's |

Alg. 1 itself (targeted UAPs) is `perturb/uap.py`; the trigger forms and the adaptive cost, shared with the
Neural Cleanse baseline, are `perturb/triggers.py` and `perturb/cost.py`. A new family of detector is a new module
here, named in `ScanSettings.covers` and `report/rows.FAMILY_NAMES`, and run by `pipeline._other_families`.
"""
