"""What a checkpoint format can hold, decided before calibration: names, scale dtypes, the
layers a recipe targets, and the all-layers-at-once layout check with its ways out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from ferroquant.api import target_layers
from ferroquant.config import GPTQ
from ferroquant.formats import save
from ferroquant.formats.common import CheckpointError
from ferroquant.formats.feasibility import (
    V2_NOTE,
    TargetLayer,
    canonical_checkpoint_format,
    canonical_format,
    check_feasible,
    resolve_checkpoint_format,
    scale_dtype_for,
)
from test_formats_common import args_of, block_linears, quantize, tiny_llama
from tiny_models import tiny_lm


@pytest.mark.parametrize("spelling, canonical", [
    ("gptq", "gptq"), ("gptq_v1", "gptq"), ("v1", "gptq"), ("V1", "gptq"),
    ("gptq_v2", "gptq_v2"), ("v2", "gptq_v2"), ("GPTQ_V2", "gptq_v2"),
])
def test_checkpoint_format_spellings(spelling: str, canonical: str) -> None:
    assert canonical_checkpoint_format(spelling) == canonical


def test_unknown_format_names() -> None:
    with pytest.raises(ValueError, match="checkpoint_format 'marlin': expected 'gptq' / 'v1' or 'gptq_v2' / 'v2'"):
        canonical_checkpoint_format("marlin")
    assert canonical_format("CT") == canonical_format("compressed_tensors") == "compressed-tensors"
    with pytest.raises(ValueError, match="format 'onnx': expected 'gptq' or 'compressed-tensors'"):
        canonical_format("onnx")


def test_scale_dtype_for() -> None:
    for cf in ("gptq", "gptq_v2", None):
        assert scale_dtype_for("gptq", cf, torch.bfloat16) == torch.float16
    assert scale_dtype_for("compressed-tensors", None, torch.bfloat16) == torch.bfloat16
    assert scale_dtype_for("ct", None, torch.float32) == torch.float32


def test_resolve_checkpoint_format() -> None:
    assert resolve_checkpoint_format("gptq", None, False) == ("gptq", None)
    assert resolve_checkpoint_format("gptq", None, True) == ("gptq_v2", V2_NOTE)
    assert V2_NOTE == "asymmetric scheme: writing GPTQ v2 (v1 cannot store a zero point of 0)"
    assert resolve_checkpoint_format("gptq", "v2", False) == ("gptq_v2", None)
    assert resolve_checkpoint_format("gptq", "gptq_v1", False) == ("gptq", None)
    assert resolve_checkpoint_format("compressed-tensors", None, True) == (None, None)
    with pytest.raises(CheckpointError, match=r"zero point of 0; use --checkpoint-format v2 .*--format compressed-tensors"):
        resolve_checkpoint_format("gptq", "v1", True, hint="cli")
    with pytest.raises(CheckpointError, match=r"use checkpoint_format='gptq_v2' .*format='compressed-tensors'"):
        resolve_checkpoint_format("gptq", "gptq", True)
    with pytest.raises(CheckpointError, match="--checkpoint-format 'v2' applies to the GPTQ format only"):
        resolve_checkpoint_format("compressed-tensors", "v2", False, hint="cli")


def test_target_layers_follow_the_pipeline_rule() -> None:
    model = tiny_llama(inter=172, tie=False)
    layers = target_layers(model, GPTQ(scheme="W4A16", group_size=32, ignore=["lm_head", "re:.*k_proj$"]))
    names = [la.name for la in layers]
    assert names == [n for n in block_linears(model) if not n.endswith("k_proj")]
    down = next(la for la in layers if la.name.endswith("0.mlp.down_proj"))
    assert (down.out_features, down.in_features, down.is_conv1d) == (64, 172, False)
    assert down.args.effective_group_size == 32
    # outside the blocks only a full name or regex claims a layer, never the class name
    assert "lm_head" not in [la.name for la in target_layers(model, GPTQ(ignore=[]))]
    assert "lm_head" in [la.name for la in target_layers(
        model, GPTQ(targets=["Linear", "lm_head"], ignore=[]))]
    gpt2 = target_layers(tiny_lm("gpt2"), GPTQ())
    assert gpt2 and all(la.is_conv1d for la in gpt2)
    c_fc = next(la for la in gpt2 if la.name.endswith("0.mlp.c_fc"))
    assert (c_fc.out_features, c_fc.in_features) == (256, 64)  # Linear orientation


def _layers(model, **recipe) -> list[TargetLayer]:
    return target_layers(model, GPTQ(**recipe))


def test_gptq_lists_every_offending_layer_with_ways_out_where_the_user_is() -> None:
    layers = _layers(tiny_llama(inter=172), scheme="W4A16", group_size=-1)
    with pytest.raises(CheckpointError) as ei:
        check_feasible(layers, "gptq", "gptq", hint="cli")
    msg = str(ei.value)
    assert msg.startswith("6 layer(s) cannot be stored in the GPTQ format:")
    for i in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{p}" in msg
    assert "self_attn" not in msg
    assert "out_features=172 x 4 bits" in msg and "in_features=172 x 4 bits" in msg
    assert "--format compressed-tensors" in msg
    assert "--ignore 're:.*\\.(down_proj|gate_proj|up_proj)$'" in msg
    assert "format='compressed-tensors'" not in msg and "ignore=[" not in msg
    with pytest.raises(CheckpointError) as ei:
        check_feasible(layers, "gptq", "gptq_v2", hint="api")
    msg = str(ei.value)
    assert "format='compressed-tensors'" in msg and "ignore=[..., 're:" in msg
    assert "--format" not in msg and "--ignore" not in msg


def test_other_format_not_suggested_when_it_fails_on_the_same_layer() -> None:
    # 172 inputs with groups of 32: compressed-tensors refuses it, and so does GPTQ's packing
    layers = _layers(tiny_llama(inter=172), scheme="W4A16", group_size=32)
    with pytest.raises(CheckpointError) as ei:
        check_feasible(layers, "compressed-tensors", None, hint="cli")
    msg = str(ei.value)
    assert msg.startswith("2 layer(s) cannot be stored in the compressed-tensors format:")
    assert "model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj: in_features=172 is not a multiple of group_size=32" in msg
    assert "--format gptq" not in msg
    assert "--group-size -1 (per channel)" in msg
    assert "--ignore model.layers.0.mlp.down_proj --ignore model.layers.1.mlp.down_proj" in msg
    # GPTQ with the default group 128: compressed-tensors would need per-channel groups too
    with pytest.raises(CheckpointError) as ei:
        check_feasible(_layers(tiny_llama(inter=172)), "gptq", "gptq", hint="cli")
    assert "--format compressed-tensors --group-size -1;" in str(ei.value)


def test_other_format_and_a_fitting_group_size_suggested_when_they_hold_it() -> None:
    layers = _layers(tiny_llama(inter=96), scheme="W4A16", group_size=64)
    with pytest.raises(CheckpointError) as ei:
        check_feasible(layers, "compressed-tensors", None, hint="api")
    msg = str(ei.value)
    assert "in_features=96 is not a multiple of group_size=64" in msg
    assert "format='gptq'" in msg
    assert "group_size=-1 (per channel) or group_size=32 in the recipe" in msg
    check_feasible(layers, "gptq", "gptq", hint="api")  # GPTQ holds 96 inputs in any groups


def test_conv1d_under_compressed_tensors_and_asymmetric_v1() -> None:
    gpt2 = _layers(tiny_lm("gpt2"))
    with pytest.raises(CheckpointError, match=r"(?s)8 layer\(s\).*Conv1D.*ways out: --format gptq;"):
        check_feasible(gpt2, "compressed-tensors", None, hint="cli")
    check_feasible(gpt2, "gptq", "gptq", hint="cli")
    asym = _layers(tiny_llama(), scheme="W4A16_ASYM", group_size=32)
    with pytest.raises(CheckpointError) as ei:
        check_feasible(asym, "gptq", "gptq", hint="cli")
    msg = str(ei.value)
    assert msg.startswith(f"{len(asym)} layer(s) cannot be stored in the GPTQ v1 format:")
    assert "--checkpoint-format v2" in msg and "--format compressed-tensors" in msg
    check_feasible(asym, "gptq", "gptq_v2", hint="cli")
    check_feasible(asym, "compressed-tensors", None, hint="cli")


@pytest.mark.parametrize("fmt, gs", [("gptq", -1), ("gptq", 32), ("compressed-tensors", 32),
                                     ("compressed-tensors", -1)])
def test_check_feasible_agrees_with_save(tmp_path: Path, fmt: str, gs: int) -> None:
    """The up-front check and the writer apply one rule: each refuses exactly what the other does."""
    model = tiny_llama(inter=172)
    layers = _layers(model, scheme="W4A16", group_size=gs)
    try:
        check_feasible(layers, fmt, "gptq", hint="api")
        feasible = True
    except CheckpointError as e:
        feasible = False
        first = re.search(r"(model\.layers\.\d+\.mlp\.\w+)", str(e)).group(1)
    quantize(model, args_of(4, gs), [la.name for la in layers])
    if feasible:
        save(model, tmp_path / "ok", format=fmt)
    else:
        with pytest.raises(CheckpointError, match=re.escape(first)):
            save(model, tmp_path / "bad", format=fmt)


@pytest.mark.parametrize("scheme, what", [
    ("W8A8", ["input activations int8 per-token dynamic (symmetric)"]),
    ("W8A8_STATIC", ["input activations int8 per-tensor static (symmetric, static_minmax)"]),
    ("FP8", ["FP8 weights",
             "input activations fp8 per-tensor static (symmetric, static_minmax)"]),
    ("FP8_DYNAMIC", ["FP8 weights", "input activations fp8 per-token dynamic (symmetric)"]),
    ("W4A8", ["input activations int8 per-token dynamic (symmetric)"]),
    ("W4AFP8", ["input activations fp8 per-token dynamic (symmetric)"]),
])
def test_gptq_refuses_activation_schemes_before_calibration(scheme: str, what: list[str]) -> None:
    model = tiny_llama(hidden=128, inter=256)
    recipe = GPTQ(scheme=scheme)
    layers = _layers(model, scheme=scheme)
    with pytest.raises(CheckpointError) as ei:
        check_feasible(layers, "gptq", "gptq", hint="cli", recipe=recipe)
    assert str(ei.value) == (
        "the GPTQ format holds integer weights only, but the recipe also quantizes:\n"
        + "".join(f"  config group 'group_0': {w}\n" for w in what)
        + "ways out: --format compressed-tensors (which holds FP8 weights, activation and "
        "KV-cache scales)")
    check_feasible(layers, "compressed-tensors", None, hint="cli", recipe=recipe)


def test_gptq_refuses_a_kv_cache_scheme_and_fp8_layers() -> None:
    model = tiny_llama(hidden=128, inter=256)
    recipe = GPTQ(scheme={"W4A16": ["re:.*mlp.*"]},
                  kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "attn_head"})
    with pytest.raises(CheckpointError, match=r"quantizes:\n  kv_cache_scheme fp8 per-head "
                       r"static \(symmetric\)\nways out: format='compressed-tensors'"):
        check_feasible(target_layers(model, recipe), "gptq", "gptq_v2", hint="api", recipe=recipe)
    # without the recipe (a checkpoint's layers), FP8 weights are refused layer by layer
    fp8 = _layers(model, scheme="FP8")
    with pytest.raises(CheckpointError) as ei:
        check_feasible(fp8, "gptq", "gptq", hint="api")
    msg = str(ei.value)
    assert "FP8 weights: GPTQ stores integer codes only" in msg
    assert "ways out: format='compressed-tensors'; or leave them unquantized" in msg
    assert "gptq_v2" not in msg


def test_quantize_for_gptq_refuses_activations_before_calibrating() -> None:
    from ferroquant import quantize

    model = tiny_llama(hidden=128, inter=256)
    with pytest.raises(CheckpointError, match="the GPTQ format holds integer weights only"):
        quantize(model, "W8A8", torch.randint(3, 96, (2, 8)), format="gptq", method="rtn",
                 show_progress=False)
    assert not any(hasattr(m, "fq_quant") for m in model.modules())
