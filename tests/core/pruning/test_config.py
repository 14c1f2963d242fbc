"""PruneConfig's method settings: names from the registry, options owned and checked by each method."""

import pytest
from pydantic import ValidationError

from core.pruning.config import PruneConfig
from core.pruning.methods import REGISTRY, get


def errors(**kw):
    with pytest.raises(ValidationError) as e:
        PruneConfig(model="m", sparsity=0.5, **kw)
    return [(tuple(x["loc"]), x["msg"]) for x in e.value.errors()]


def test_method_options_are_filled_with_the_chosen_methods_defaults():
    assert PruneConfig(model="m", sparsity=0.5, method="sparsegpt").method_options == {
        "blocksize": 128,
        "percdamp": 0.01,
    }
    assert PruneConfig(model="m", sparsity=0.5).method_options == {"wanda_alpha_search": False}
    cfg = PruneConfig(model="m", sparsity=0.5, method="magnitude", method_options={"magnitude_scope": "row"})
    assert get("magnitude")(cfg).options.magnitude_scope == "row"


def test_flat_settings_of_the_chosen_method_still_work():
    cfg = PruneConfig(model="m", sparsity=0.5, method="sparsegpt", percdamp=0.1, blocksize=64)
    assert cfg.method_options == {"blocksize": 64, "percdamp": 0.1}
    assert "percdamp" not in cfg.model_dump()
    assert PruneConfig.model_validate(cfg.model_dump()) == cfg  # what a job stores reads back the same


def test_a_setting_of_another_method_is_refused_naming_the_field():
    assert errors(method="wanda", percdamp=0.1) == [
        (("percdamp",), "a setting of sparsegpt, not of the chosen method wanda")
    ]


def test_a_stored_config_of_the_flat_layout_still_validates():
    old = {
        "model": "m",
        "sparsity": 0.5,
        "method": "wanda",
        "magnitude_scope": "layer",
        "wanda_alpha_search": True,
        "blocksize": 128,
        "percdamp": 0.01,
    }  # every method's settings, as dumped
    assert PruneConfig.model_validate(old).method_options == {"wanda_alpha_search": True}


def test_method_options_are_checked_against_the_method():
    assert errors(method="sparsegpt", method_options={"percdamp": 0}) == [
        (("method_options", "percdamp"), "Input should be greater than 0")
    ]
    assert errors(method="wanda", method_options={"percdamp": 0.1})[0][0] == ("method_options", "percdamp")


def test_unknown_method_names_the_registered_ones():
    [(loc, msg)] = errors(method="obs")
    assert loc == ("method",) and all(name in msg for name in REGISTRY)


def test_json_schema_lists_the_registered_methods():
    schema = PruneConfig.model_json_schema()["properties"]["method"]
    assert schema["enum"] == sorted(REGISTRY) and schema["default"] == "wanda"
