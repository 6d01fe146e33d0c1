"""The dataset screen (`backdoorscan filter`): Xue et al.'s intentional adversarial perturbations, or a model
scan's triggers undone (`--method erase`).

| module | holds |
|---|---|
| `pipeline.py` | `filter_dataset`: load -> untargeted L-inf UAP -> per-class calibration -> screen every input |
| `rule.py` | `UapRule` and `uap_rule`: which images' predictions survive the UAP (a trigger) |
| `erase.py` | `erase_rule` and `erase_flags`: which images leave a scanned trigger's target once it is undone |

The rule's stored form (`--save-uap` / `--uap`) is `report/uap_file.py`; the triggers the erasure rule reads
(`--triggers`) are `report/trigger_file.py`; the STRIP baseline is `baselines/strip.py`.
"""
