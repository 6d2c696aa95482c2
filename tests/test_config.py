"""Recipe layer: presets, validation, overrides, matching rules, YAML/JSON round trips."""

from __future__ import annotations

import json

import pytest
import yaml
from ferroquant.config import (
    GPTQ,
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    match_specificity,
    match_target,
    preset_scheme,
)
from pydantic import ValidationError
from torch import nn


class Conv1D(nn.Module):  # same class name as transformers' GPT-2 layer
    def __init__(self) -> None:
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(nn.init.zeros_(nn.Linear(4, 4).weight))


class MyLinear(nn.Linear):
    pass


# ------------------------------------------------------------------------------------------
# presets and validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,bits,sym",
    [("W4A16", 4, True), ("W4A16_ASYM", 4, False), ("W8A16", 8, True), ("W3A16", 3, True),
     ("W2A16", 2, True)],
)
def test_presets(name: str, bits: int, sym: bool) -> None:
    a = preset_scheme(name)
    assert (a.num_bits, a.symmetric, a.type, a.strategy, a.group_size) == (bits, sym, "int",
                                                                          "group", 128)
    assert a.effective_group_size == 128
    # preset_scheme returns a copy: mutating it does not change the table
    a.group_size = 7
    assert PRESET_SCHEMES[name]["weights"].group_size == 128
    assert preset_scheme(name.lower()).num_bits == bits


def test_default_recipe_is_w4a16_static_actorder() -> None:
    r = GPTQ()
    (g,) = r.resolved_groups().values()
    assert g.targets == ["Linear"]
    assert g.weights.num_bits == 4 and g.weights.group_size == 128 and g.weights.symmetric
    assert g.weights.actorder == "static"
    assert r.ignore == ["lm_head"] and r.true_sequential and r.block_size == 128
    assert r.dampening_frac == 0.01 and r.unreached_policy == "rtn"


def test_scheme_and_config_groups_together_is_an_error() -> None:
    with pytest.raises(ValidationError, match="either scheme or config_groups"):
        GPTQ(scheme="W4A16", config_groups={"g": {"targets": ["Linear"], "weights": {}}})


def test_unknown_scheme_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="unknown scheme 'W5A16'"):
        GPTQ(scheme="W5A16")
    with pytest.raises(ValidationError, match="num_bits must be one of"):
        QuantizationArgs(num_bits=5)
    with pytest.raises(ValidationError, match="positive group_size"):
        QuantizationArgs(strategy="group", group_size=None)
    with pytest.raises(ValidationError, match="dampening_frac"):
        GPTQ(dampening_frac=0.0)
    with pytest.raises(ValidationError, match="block_size"):
        GPTQ(block_size=0)
    with pytest.raises(ValidationError, match="group_size"):
        GPTQ(group_size=0)
    with pytest.raises(ValidationError, match="extra"):
        GPTQ(dampening=0.1)  # typo of dampening_frac
    with pytest.raises(ValidationError, match="invalid regular expression"):
        GPTQ(ignore=["re:(unclosed"])
    with pytest.raises(ValidationError, match="targets applies to scheme"):
        GPTQ(targets=["Linear"], config_groups={"g": {"targets": ["Linear"], "weights": {}}})


def test_group_size_override_and_per_channel() -> None:
    (g,) = GPTQ(scheme="W3A16", group_size=64).resolved_groups().values()
    assert (g.weights.num_bits, g.weights.group_size, g.weights.strategy) == (3, 64, "group")
    (g,) = GPTQ(scheme="W4A16", group_size=-1).resolved_groups().values()
    assert g.weights.strategy == "channel" and g.weights.effective_group_size == -1


def test_observer_override() -> None:
    (g,) = GPTQ(observer="mse").resolved_groups().values()
    assert g.weights.observer == "mse"


def test_actorder_resolution() -> None:
    groups = {
        "a": {"targets": ["re:.*q_proj$"], "weights": {"num_bits": 4, "actorder": "group"}},
        "b": {"targets": ["Linear"], "weights": {"num_bits": 8}},
    }
    res = GPTQ(config_groups=groups).resolved_groups()
    assert res["a"].weights.actorder == "group"  # the group's own setting is kept
    assert res["b"].weights.actorder == "static"  # the recipe default fills in
    res = GPTQ(config_groups={"b": groups["b"]}, actorder=None).resolved_groups()
    assert res["b"].weights.actorder is None
    with pytest.raises(ValidationError, match="sets actorder='group' but the recipe sets"):
        GPTQ(config_groups=groups, actorder="static")
    for spelling in ("none", "None", "off", False):
        assert GPTQ(actorder=spelling).actorder is None


def test_config_group_accepts_a_single_target_string() -> None:
    g = QuantizationScheme(targets="Linear", weights=QuantizationArgs())
    assert g.targets == ["Linear"]


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------


def test_match_class_name_full_name_and_regex() -> None:
    lin = nn.Linear(4, 4)
    name = "model.layers.0.self_attn.q_proj"
    assert match_target(name, lin, "Linear")
    assert match_target(name, MyLinear(4, 4), "Linear")  # subclasses match their bases
    assert not match_target(name, nn.Embedding(4, 4), "Linear")
    assert match_target(name, lin, name)
    assert not match_target(name, lin, "q_proj")  # plain strings are not substrings
    assert match_target(name, lin, "re:.*q_proj$")
    assert match_target(name, lin, "re:model\\.layers\\.0\\.")  # re.match: prefix anchored
    assert not match_target(name, lin, "re:q_proj")  # not found at the start
    assert not match_target(name + "_x", lin, "re:.*q_proj$")
    assert match_specificity(name, lin, name) == 3
    assert match_specificity(name, lin, "re:.*q_proj") == 2
    assert match_specificity(name, lin, "Linear") == 1


def test_linear_matches_conv1d() -> None:
    c = Conv1D()
    assert match_target("transformer.h.0.attn.c_attn", c, "Linear")
    assert match_target("transformer.h.0.attn.c_attn", c, "Conv1D")
    assert not match_target("x", nn.Linear(2, 2), "Conv1D")


def test_args_for_ignore_wins_and_outside_blocks() -> None:
    lin = nn.Linear(4, 4)
    r = GPTQ(ignore=["lm_head", "re:.*down_proj$"])
    assert r.args_for("model.layers.0.mlp.up_proj", lin) is not None
    assert r.args_for("model.layers.0.mlp.down_proj", lin) is None
    # outside the decoder blocks only a name or regex target counts, never "Linear"
    assert r.args_for("lm_head", lin, in_block=False) is None
    r2 = GPTQ(targets=["Linear", "lm_head"], ignore=[])
    assert r2.args_for("lm_head", lin, in_block=False) is not None
    assert r2.args_for("score", lin, in_block=False) is None
    # ignore wins over an explicit full-name target
    assert GPTQ(targets=["lm_head"]).args_for("lm_head", lin, in_block=False) is None


def test_config_groups_most_specific_wins_and_ties_fail() -> None:
    lin = nn.Linear(4, 4)
    r = GPTQ(config_groups={
        "all": {"targets": ["Linear"], "weights": {"num_bits": 4}},
        "down": {"targets": ["re:.*down_proj$"], "weights": {"num_bits": 8}},
        "one": {"targets": ["model.layers.1.mlp.down_proj"], "weights": {"num_bits": 2}},
    })
    assert r.args_for("model.layers.0.mlp.up_proj", lin).num_bits == 4
    assert r.args_for("model.layers.0.mlp.down_proj", lin).num_bits == 8
    assert r.args_for("model.layers.1.mlp.down_proj", lin).num_bits == 2
    tie = GPTQ(config_groups={
        "a": {"targets": ["re:.*proj$"], "weights": {}},
        "b": {"targets": ["re:.*down.*"], "weights": {}},
    })
    with pytest.raises(ValueError, match="equally specifically"):
        tie.args_for("model.layers.0.mlp.down_proj", lin)


# ------------------------------------------------------------------------------------------
# serialization
# ------------------------------------------------------------------------------------------


def _rich_recipe() -> GPTQ:
    return GPTQ(
        config_groups={
            "attn": {"targets": ["re:.*self_attn\\..*"],
                     "weights": {"num_bits": 4, "symmetric": False, "group_size": 64,
                                 "observer": "mse", "actorder": "group"}},
            "mlp": {"targets": ["re:.*mlp\\..*"],
                    "weights": {"num_bits": 8, "strategy": "channel", "group_size": None}},
        },
        ignore=["lm_head", "re:.*layers\\.0\\..*"],
        block_size=64, dampening_frac=0.05, true_sequential=False, offload_hessians=True,
        sequential_targets=["model.layers"], unreached_policy="error",
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("make", [
    _rich_recipe,
    lambda: GPTQ(scheme="W3A16", group_size=32, actorder=None, observer="mse"),
    lambda: GPTQ(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 8}}},
                 actorder="group"),
])
def test_file_round_trip(tmp_path, suffix, make) -> None:
    r = make()
    p = r.to_file(tmp_path / f"recipe{suffix}")
    back = GPTQ.from_file(p)
    assert back == r
    assert back.resolved_groups() == r.resolved_groups()
    assert back.to_dict() == r.to_dict()
    # every recipe-level setting is recorded, so the file documents the run on its own
    assert {"block_size", "dampening_frac", "true_sequential", "ignore"} <= set(r.to_dict())
    # the file is plain YAML/JSON another tool can read
    text = p.read_text()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert data == r.to_dict()
    assert GPTQ.coerce(str(p)) == r and GPTQ.coerce(p) == r and GPTQ.coerce(data) == r


def test_llm_compressor_style_nesting(tmp_path) -> None:
    p = tmp_path / "recipe.yaml"
    p.write_text(
        "quant_stage:\n"
        "  quant_modifiers:\n"
        "    GPTQModifier:\n"
        "      scheme: W4A16\n"
        "      targets: Linear\n"
        "      ignore: [lm_head]\n"
        "      dampening_frac: 0.02\n"
        "      actorder: static\n"
    )
    r = GPTQ.from_file(p)
    assert r.scheme == "W4A16" and r.targets == ["Linear"] and r.dampening_frac == 0.02


def test_from_file_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml.*not valid YAML"):
        GPTQ.from_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"scheme": "W9A16"}))
    with pytest.raises(ValueError, match="(?s)wrong.json.*unknown scheme"):
        GPTQ.from_file(wrong)
    with pytest.raises(OSError, match="missing.yaml"):
        GPTQ.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="extension"):
        GPTQ().to_file(tmp_path / "recipe.toml")
    with pytest.raises(TypeError, match="recipe must be"):
        GPTQ.coerce(42)  # type: ignore[arg-type]
    assert GPTQ.coerce("w4a16").scheme == "W4A16"
