"""Bad input, cause 7 of issue 33: every file the project writes is JSON that strict parsers read (no bare NaN);
``scores.json``'s undefined correlations are null (tests/test_api_commands.py), and a non-finite score never
reaches a placement or a manifest."""

import pytest

from hetmoe_compile.base.errors import HetMoEError


def test_non_finite_numbers_never_reach_a_json_file(tmp_path):
    """Issue 33, cause 7: a NaN score would rank nothing and write a manifest strict parsers refuse; it is refused
    where the scores enter, and the writers refuse any non-finite number rather than write bare NaN."""
    import numpy as np

    from hetmoe_compile import PlacementPolicy
    from hetmoe_compile.base.io import finite_json
    from hetmoe_compile.compose.pipeline import place_scores
    from hetmoe_compile.models.recognize import recognize
    from hetmoe_compile.models.tiny import tiny_model
    from hetmoe_compile.scoring import Scores

    model = tiny_model("olmoe")
    info = recognize(model)
    layers = {l.index: np.arange(l.num_experts, dtype=float) for l in info.moe_layers}
    layers[info.moe_layers[0].index][3] = np.nan
    with pytest.raises(HetMoEError, match=r"scores from 'mine' are not finite numbers for layer \d+'s experts \[3\]"):
        place_scores(model, info, Scores("mine", layers), PlacementPolicy(0.25))
    with pytest.raises(HetMoEError, match=r"x.json: the value at /layers/0/score is not a finite number"):
        finite_json({"layers": [{"score": float("nan")}]}, "x.json")
    assert finite_json({"a": [1.0, 2]}, "x.json", indent=None) == '{"a": [1.0, 2]}'
