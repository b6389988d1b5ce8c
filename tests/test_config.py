"""Recipes: frozen, validated, and round-tripped through plain dicts with a version."""
import json

import pytest

from bayesq_onnx.config import CONFIG_VERSION, Recipe


def test_recipe_round_trips_through_json():
    r = Recipe(bits=3.5, method="rtn", seed=7, blocks=(64, 128))
    d = json.loads(json.dumps(r.to_dict()))        # tuples come back as lists
    assert d["version"] == CONFIG_VERSION
    assert Recipe.from_dict(d) == r


@pytest.mark.parametrize("bad", [{"version": CONFIG_VERSION + 1}, {"colour": "red"}])
def test_recipe_from_dict_rejects_unknown(bad):
    with pytest.raises(ValueError):
        Recipe.from_dict({"bits": 3.0, **bad})


@pytest.mark.parametrize("kw", [{"bits": 0}, {"bits": float("nan")}, {"bits": 3, "method": "magic"},
                                {"bits": 3, "holdout": 1.0}, {"bits": 3, "tables": "guess"},
                                {"bits": 3, "gptq_damp": 0.0}, {"bits": 3, "gptq_damp": float("nan")}])
def test_recipe_validates(kw):
    with pytest.raises(ValueError):
        Recipe(**kw)
