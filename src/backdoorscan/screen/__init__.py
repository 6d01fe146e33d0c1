"""The dataset screen (`backdoorscan filter`): Xue et al.'s intentional adversarial perturbations.

| module | holds |
|---|---|
| `pipeline.py` | `filter_dataset`: load -> untargeted L-inf UAP -> per-class calibration -> screen every input |
| `rule.py` | `UapRule` and `uap_rule`: which images' predictions survive the UAP (a trigger) |

The rule's stored form (`--save-uap` / `--uap`) is `report/uap_file.py`; the STRIP baseline is `baselines/strip.py`.
"""
