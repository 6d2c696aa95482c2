"""compressed-tensors pack-quantized writer: tensors decoded with compressed-tensors' own
unpacker, the config validated by its own QuantizationConfig, and GPTQ == compressed-tensors
for symmetric int4."""

from __future__ import annotations

import json
from pathlib import Path

import ferroquant.formats as fmt
import pytest
import torch
from safetensors.torch import load_file
from test_formats_common import args_of, block_linears, quantize, tiny_llama

ct = pytest.importorskip("compressed_tensors")


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


@pytest.mark.parametrize(
    "bits,gs,sym,actorder",
    [(4, 32, True, None), (4, 32, False, "static"), (8, -1, False, None), (3, 16, True, None),
     (2, 64, False, None), (4, 32, True, "group")],
)
def test_layout_matches_compressed_tensors(tmp_path: Path, bits: int, gs: int, sym: bool, actorder: str | None) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    model = quantize(tiny_llama(), args_of(bits, gs, sym, actorder))
    if actorder == "group":
        with pytest.warns(UserWarning, match="actorder='group'"):
            out = fmt.save(model, tmp_path / "c", format="compressed-tensors")
    else:
        out = fmt.save(model, tmp_path / "c", format="compressed-tensors")
    t = _tensors(out)
    for name in block_linears(model):
        q = model.get_submodule(name).fq_quant
        out_f, in_f = q.codes.shape
        ng = q.scales.shape[1]
        packed = t[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (out_f, -(-in_f * bits // 32))
        assert torch.equal(t[f"{name}.weight_shape"], torch.tensor([out_f, in_f]))
        signed = unpack_from_int32(packed, bits, torch.Size([out_f, in_f]))
        assert torch.equal(signed.to(torch.int32) + (1 << (bits - 1)), q.codes.to(torch.int32)), name
        scale = t[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (out_f, ng)
        assert torch.equal(scale, q.scales)
        if sym:
            assert f"{name}.weight_zero_point" not in t
            assert bool((q.zeros == 1 << (bits - 1)).all())
        else:
            zp = unpack_from_int32(t[f"{name}.weight_zero_point"], bits, torch.Size([out_f, ng]), packed_dim=0)
            assert torch.equal(zp.to(torch.int32) + (1 << (bits - 1)), q.zeros)
        assert (f"{name}.weight_g_idx" in t) is (actorder == "group")
        if actorder == "group":
            assert torch.equal(t[f"{name}.weight_g_idx"], q.g_idx)
        assert f"{name}.weight" not in t
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["version"] == ct.__version__
    assert qc["ignore"] == ["lm_head"] and qc["kv_cache_scheme"] is None
    (g,) = qc["config_groups"].values()
    w = g["weights"]
    assert g["targets"] == ["Linear"] and g["format"] == "pack-quantized"
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"], w["dynamic"]) == (
        bits, "int", sym, "channel" if gs == -1 else "group", None if gs == -1 else gs, False)
    assert w.get("actorder") == actorder
    if actorder != "group":  # compressed-tensors >= 0.20 rejects actorder 'group' by design
        parsed = QuantizationConfig.model_validate(qc)
        assert parsed.format == "pack-quantized"
        assert parsed.config_groups["group_0"].weights.num_bits == bits


def test_symmetric_int4_gptq_and_ct_dequantize_identically(tmp_path: Path) -> None:
    model = quantize(tiny_llama(), args_of(4, 32, True), scales_fp16=True)
    g = fmt.load(fmt.save(model, tmp_path / "g", format="gptq"))
    c = fmt.load(fmt.save(model, tmp_path / "c", format="compressed-tensors"))
    gt, ctt = _tensors(tmp_path / "g"), _tensors(tmp_path / "c")
    for name in block_linears(model):
        # same numbers on disk: GPTQ code q, compressed-tensors q - 8 stored shifted by +8
        assert torch.equal(g.get_submodule(name).codes, c.get_submodule(name).codes)
        assert torch.equal(g.get_submodule(name).dequantize(), c.get_submodule(name).dequantize())
        assert torch.equal(c.get_submodule(name).dequantize(), model.get_submodule(name).weight)
        assert torch.equal(gt[f"{name}.scales"].float().t(), ctt[f"{name}.weight_scale"])


def test_refuses_partial_groups_and_conv1d(tmp_path: Path) -> None:
    model = quantize(tiny_llama(inter=80), args_of(4, 32, True))  # down_proj in=80: 80 % 32 != 0
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*in_features=80.*group_size=32.*format='gptq'"):
        fmt.save(model, tmp_path / "c", format="compressed-tensors")
    assert not (tmp_path / "c").exists()

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=32)).eval()
    names = [n for n, m in gpt2.named_modules() if type(m).__name__ == "Conv1D"]
    for n in names:  # quantize a Conv1D the way the pipeline does: transposed to [out, in]
        from ferroquant import solver
        from ferroquant.quantized import QuantizedWeight

        mod = gpt2.get_submodule(n)
        r = solver.rtn_quantize(mod.weight.data.t(), bits=4, group_size=32)
        q = QuantizedWeight(r.codes, r.scales.half().float(), r.zeros, r.g_idx, args_of(4, 32))
        mod.weight.data = q.dequantize().t().contiguous()
        mod.fq_quant = q
    with pytest.raises(ValueError, match="Conv1D.*format='gptq'"):
        fmt.save(gpt2, tmp_path / "c2", format="compressed-tensors")
    ids = torch.randint(0, 64, (1, 10))
    loaded = fmt.load(fmt.save(gpt2, tmp_path / "g2", format="gptq"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, gpt2(ids).logits, atol=1e-5, rtol=0)


def test_config_targets_follow_the_recipe_matching_rule() -> None:
    from ferroquant.formats.compressed_tensors import CTSettings

    w4 = {"num_bits": 4, "strategy": "channel", "group_size": None, "symmetric": True}
    w8 = {**w4, "num_bits": 8}
    qc = {"format": "pack-quantized", "ignore": ["lm_head", "re:.*\\.k_proj$"], "config_groups": {
        "by_class": {"targets": ["Linear"], "weights": w4},
        "by_regex": {"targets": ["re:.*mlp\\."], "weights": w8},
        "by_name": {"targets": ["model.layers.0.mlp.up_proj"], "weights": {**w4, "num_bits": 2}},
    }}
    s = CTSettings(qc, "config.json")
    # full name > regex > class name, ignore wins: as ferroquant.config.match_specificity ranks
    assert s.for_module("model.layers.0.mlp.up_proj").num_bits == 2
    assert s.for_module("model.layers.0.mlp.down_proj").num_bits == 8
    assert s.for_module("model.layers.0.self_attn.q_proj").num_bits == 4
    assert s.for_module("model.layers.0.self_attn.k_proj") is None
    assert s.for_module("lm_head") is None
    # a class target matches the module's base classes too (a Linear subclass)
    assert s.for_module("x", torch.nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)).num_bits == 4
    assert s.for_module("x", "Embedding") is None


def test_header_check_names_file_and_tensor(tmp_path: Path) -> None:
    from ferroquant.formats import compressed_tensors as ct
    from ferroquant.formats.common import CheckpointError, CheckpointFiles

    model = quantize(tiny_llama(), args_of(4, 32, False))
    out = fmt.save(model, tmp_path / "c", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    files = CheckpointFiles(out)
    name = block_linears(model)[0]
    h = ct.check_layer_header(files, name, ct.CTSettings(qc, "config.json"))
    assert (h.args.num_bits, h.in_features, h.out_features, h.n_groups) == (4, 64, 64, 2)
    g = next(iter(qc["config_groups"].values()))
    g["weights"]["group_size"] = 16
    with pytest.raises(CheckpointError, match=rf"tensor '{name}.weight_scale' has shape \[64, 2\], expected \[64, 4\]"):
        ct.check_layer_header(files, name, ct.CTSettings(qc, "config.json"))
