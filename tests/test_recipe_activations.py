"""The recipe surface for activations and the KV cache: presets, ``scheme`` as a dict,
llm-compressor's argument names, and a clear error for each bad combination."""

from __future__ import annotations

import pytest
from ferroquant.config import GPTQ, PRESET_SCHEMES, ActivationArgs, QuantizationArgs
from pydantic import ValidationError


def _group(r: GPTQ):
    (g,) = r.resolved_groups().values()
    return g


@pytest.mark.parametrize("name, wtype, wstrategy, wbits, act", [
    ("W8A8", "int", "channel", 8, ("int", "token", True)),
    ("W8A8_STATIC", "int", "channel", 8, ("int", "tensor", False)),
    ("FP8", "float", "tensor", 8, ("float", "tensor", False)),
    ("FP8_DYNAMIC", "float", "channel", 8, ("float", "token", True)),
    ("W4A8", "int", "group", 4, ("int", "token", True)),
    ("W4A16", "int", "group", 4, None),
])
def test_presets_follow_compressed_tensors(name, wtype, wstrategy, wbits, act) -> None:
    g = _group(GPTQ(scheme=name.lower()))
    assert (g.weights.type, g.weights.strategy, g.weights.num_bits) == (wtype, wstrategy, wbits)
    if act is None:
        assert g.input_activations is None
    else:
        a = g.input_activations
        assert (a.type, a.strategy, bool(a.dynamic), a.num_bits) == (*act, 8)
        # dynamic schemes carry no observer; static ones have one
        assert (a.observer is None) == bool(a.dynamic)
    # FP8 weights get no GPTQ act-order (it is an integer-grid option)
    assert (g.weights.actorder is None) == (wtype == "float")


def test_presets_are_copies() -> None:
    g = _group(GPTQ(scheme="W8A8"))
    g.input_activations.num_bits = 4
    assert PRESET_SCHEMES["W8A8"]["input_activations"].num_bits == 8


def test_scheme_dict_makes_one_group_per_preset_and_round_trips() -> None:
    r = GPTQ(scheme={"w8a8": "re:.*self_attn.*", "W4A16": ["re:.*mlp.*"]},
             kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"})
    groups = r.resolved_groups()
    assert [g.targets for g in groups.values()] == [["re:.*self_attn.*"], ["re:.*mlp.*"]]
    assert groups["group_0"].input_activations.dynamic is True
    assert groups["group_1"].input_activations is None
    again = GPTQ.from_dict(r.to_dict())
    assert again.resolved_groups() == groups and again.kv_cache_scheme == r.kv_cache_scheme


def test_config_groups_with_activations_and_observer_kwargs() -> None:
    r = GPTQ(config_groups={"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "strategy": "tensor", "observer": "minmax",
                              "observer_kwargs": {"averaging_constant": 0.1}},
        "output_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                               "strategy": "token"}}})
    g = _group(r)
    assert g.input_activations.observer_kwargs == {"averaging_constant": 0.1}
    assert g.output_activations.type == "float"
    assert GPTQ.from_dict(r.to_dict()).resolved_groups() == r.resolved_groups()


def test_activation_strategy_defaults_like_compressed_tensors() -> None:
    assert ActivationArgs().strategy == "tensor"
    assert ActivationArgs(group_size=32, dynamic=True).strategy == "group"
    assert ActivationArgs(dynamic="local", strategy="token").dynamic == "local"
    assert ActivationArgs(strategy="tensor").describe() == "int8 per-tensor static (symmetric)"


def _err(match: str, **kw) -> None:
    with pytest.raises((ValidationError, ValueError), match=match):
        GPTQ(**kw)


def _cg(**act) -> dict:
    return {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}, "input_activations": act}}


def test_bad_input_is_a_clear_error_before_any_work() -> None:
    _err("unknown scheme 'W9A9'.*presets are", scheme="W9A9")
    _err("unknown scheme", scheme={"W9A9": ["Linear"]})
    _err("strategy 'group' need a positive group_size",
         config_groups=_cg(num_bits=8, strategy="group", dynamic=True))
    _err("FP8 .*num_bits must be 8, got 4",
         config_groups=_cg(num_bits=4, type="float", dynamic=True, strategy="token"))
    _err("FP8 .*num_bits must be 8", kv_cache_scheme={"num_bits": 4, "type": "float"})
    _err("remove observer 'minmax'",
         config_groups=_cg(dynamic=True, strategy="token", observer="minmax"))
    _err("static activation scales are per 'tensor'.*set dynamic: true",
         config_groups=_cg(strategy="token"))
    _err("unknown observer 'histogram'", config_groups=_cg(observer="histogram"))
    _err("unknown observer_kwargs", config_groups=_cg(observer_kwargs={"alpha": 1.0}))
    _err("KV cache takes calibrated static scales",
         kv_cache_scheme={"num_bits": 8, "type": "float", "dynamic": True})
    _err("only symmetric KV-cache", kv_cache_scheme={"num_bits": 8, "symmetric": False})
    _err("'attn_head' is for kv_cache_scheme only", config_groups=_cg(strategy="attn_head"))
    _err("either scheme or config_groups", scheme="W8A8", config_groups=_cg(strategy="tensor"))
    _err("carries its own targets", scheme={"W8A8": ["Linear"]}, targets=["Linear"])
    _err("FP8 weights.*group_size", scheme="FP8", group_size=64)
    _err("only dynamic output quantization", config_groups={"g": {
        "targets": ["Linear"], "weights": {}, "output_activations": {"num_bits": 8}}})
    with pytest.raises(ValidationError, match="weights are quantized statically"):
        QuantizationArgs(dynamic=True)
    with pytest.raises(ValidationError, match="integer weights: strategy must be"):
        QuantizationArgs(strategy="tensor")


def test_cli_kv_cache_flags_build_the_scheme() -> None:
    from ferroquant.cli import UserError, build_recipe

    r = build_recipe(scheme="W8A8", kv_cache="fp8")
    assert r.kv_cache_scheme.describe() == "fp8 per-tensor static (symmetric)"
    r = build_recipe(scheme="W4A16", kv_cache="int8", kv_cache_strategy="attn_head")
    assert (r.kv_cache_scheme.type, r.kv_cache_scheme.strategy) == ("int", "attn_head")
    with pytest.raises(UserError, match="--kv-cache-strategy needs --kv-cache"):
        build_recipe(kv_cache_strategy="attn_head")


def test_beyond_integer_weights_names_what_gptq_cannot_hold() -> None:
    assert GPTQ(scheme="W4A16").beyond_integer_weights() == []
    assert GPTQ(scheme="FP8_DYNAMIC", kv_cache_scheme={"type": "float"}).beyond_integer_weights() == [
        "config group 'group_0': FP8 weights",
        "config group 'group_0': input activations fp8 per-token dynamic (symmetric)",
        "kv_cache_scheme fp8 per-tensor static (symmetric)"]
