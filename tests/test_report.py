def test_machine_output_is_standard_json_even_when_a_margin_is_infinite():
    """A margin or threshold can be infinite (no candidate could flag; the warp stage on CIFAR-10); Python's json
    writes that as Infinity, which jq and CI parsers refuse. Every report goes through core.jsonout.dumps."""
    import json
    import math

    from backdoorscan.core.jsonout import dumps

    text = dumps({"margin": math.inf, "margins": {"warp": -math.inf, "pairs": 0.5}, "index": [math.nan, 1.0]})
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"margin": None, "margins": {"warp": None, "pairs": 0.5}, "index": [None, 1.0]}
