"""GPTQ writer: the published layout decoded by an independent decoder, the config fields the
engines read, and the refusals (v1 zero 0, words that do not fill, mixed bits)."""

from __future__ import annotations

import json
from pathlib import Path

import ferroquant.formats as fmt
import numpy as np
import pytest
import torch
from ferroquant.config import GPTQ
from ferroquant.quantized import ATTR
from safetensors.torch import load_file
from shared_data import STORIES
from test_formats_common import (
    args_of,
    block_linears,
    gptq_decode_qweight,
    gptq_decode_qzeros,
    quantize,
    tiny_llama,
    tree_digest,
)


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


@pytest.mark.parametrize(
    "bits,gs,sym,actorder,version",
    [
        (4, 32, True, None, 1),
        (4, 32, False, None, 2),
        (3, 32, True, "group", 1),
        (2, 64, False, "static", 2),
        (8, -1, True, None, 1),
        (4, 16, False, "group", 2),
    ],
)
def test_layout_decodes_to_in_memory_codes(tmp_path: Path, bits: int, gs: int, sym: bool,
                                           actorder: str | None, version: int) -> None:
    model = quantize(tiny_llama(), args_of(bits, gs, sym, actorder))
    out = fmt.save(model, tmp_path / "q", format="gptq",
                   checkpoint_format="gptq" if version == 1 else "gptq_v2")
    t = _all_tensors(out)
    for name in block_linears(model):
        q = model.get_submodule(name).fq_quant
        out_f, in_f = q.codes.shape
        ng = q.scales.shape[1]
        qw, qz = t[f"{name}.qweight"], t[f"{name}.qzeros"]
        assert qw.dtype == torch.int32 and qw.shape == (in_f * bits // 32, out_f)
        assert qz.dtype == torch.int32 and qz.shape == (ng, out_f * bits // 32)
        assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.scales"].shape == (ng, out_f)
        assert t[f"{name}.g_idx"].dtype == torch.int32
        codes = gptq_decode_qweight(qw.numpy(), bits, in_f)  # [in, out]
        assert np.array_equal(codes.T, q.codes.numpy()), name  # bit for bit
        zeros = gptq_decode_qzeros(qz.numpy(), bits, out_f, version)  # [ng, out]
        assert np.array_equal(zeros.T, q.zeros.numpy()), name
        assert torch.equal(t[f"{name}.g_idx"], q.g_idx)
        assert torch.equal(t[f"{name}.scales"], q.scales.t().half())
        # dequantized by the independent decoder = in-memory weight with fp16 scales
        g = t[f"{name}.g_idx"].long()
        s = t[f"{name}.scales"].float().numpy()
        w = s[g.numpy(), :] * (codes - zeros[g.numpy(), :])
        ref = q.scales.half().float()[:, g] * (q.codes.float() - q.zeros[:, g].float())
        assert np.array_equal(w.T.astype(np.float32), ref.numpy())
        assert f"{name}.weight" not in t
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert cfg == qcfg
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["group_size"] == gs
    assert cfg["sym"] is sym and cfg["checkpoint_format"] == cfg["format"] == ("gptq" if version == 1 else "gptq_v2")
    assert cfg["desc_act"] is (actorder == "group")
    assert cfg["static_groups"] is (actorder == "static")
    assert cfg["pack_dtype"] == "int32" and cfg["lm_head"] is False
    if actorder == "static":  # static groups: contiguous, trivial g_idx
        for name in block_linears(model):
            n_in = t[f"{name}.g_idx"].numel()
            assert torch.equal(t[f"{name}.g_idx"], torch.arange(n_in, dtype=torch.int32) // gs)


def test_config_accepted_by_transformers_gptqconfig(tmp_path: Path) -> None:
    from transformers import GPTQConfig

    model = quantize(tiny_llama(), args_of(4, 32, False))
    model.fq_recipe = GPTQ(scheme="W4A16_ASYM", group_size=32, dampening_frac=0.05, true_sequential=False)
    out = fmt.save(model, tmp_path / "q", checkpoint_format="gptq_v2")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    c = GPTQConfig.from_dict(qc)
    assert (c.bits, c.group_size, c.desc_act, c.sym, c.format) == (4, 32, False, False, "gptq_v2")
    assert c.damp_percent == 0.05 and c.true_sequential is False
    recipe = GPTQ.from_file(out / "recipe.yaml")
    assert recipe.dampening_frac == 0.05 and recipe.scheme == "W4A16_ASYM" and recipe.group_size == 32


def test_v1_refuses_zero_point_zero(tmp_path: Path) -> None:
    model = quantize(tiny_llama(), args_of(4, 32, False))
    name = block_linears(model)[0]
    q = model.get_submodule(name).fq_quant
    q.zeros[3, 1] = 0
    with pytest.raises(ValueError, match=rf"{name}.*zero point 0.*gptq_v2"):
        fmt.save(model, tmp_path / "v1", format="gptq")
    assert not (tmp_path / "v1").exists()
    out = fmt.save(model, tmp_path / "v2", format="gptq", checkpoint_format="gptq_v2")
    back = fmt.load(out).get_submodule(name)
    assert torch.equal(back.zeros, q.zeros) and torch.equal(back.codes, q.codes)


def test_refuses_layers_that_do_not_fill_words(tmp_path: Path) -> None:
    model = quantize(tiny_llama(inter=76), args_of(4, 4, True))  # 76*4 % 32 != 0
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up)_proj.*out_features=76.*compressed-tensors"):
        fmt.save(model, tmp_path / "g", format="gptq")
    # compressed-tensors packs densely and takes it
    fmt.save(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "g").exists()


def test_mixed_bits_need_dynamic(tmp_path: Path) -> None:
    model = tiny_llama()
    names = block_linears(model)
    quantize(model, args_of(4, 32), [n for n in names if "mlp" not in n])
    quantize(model, args_of(8, 32), [n for n in names if "mlp" in n])
    with pytest.raises(ValueError, match="gptq_dynamic=True"):
        fmt.save(model, tmp_path / "g")
    out = fmt.save(model, tmp_path / "g", gptq_dynamic=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4
    mlp = [n for n in names if "mlp" in n]
    assert {k for k in qc["dynamic"]} == {f"+:^{n.replace('.', chr(92) + '.')}$" for n in mlp}
    loaded = fmt.load(out)
    for n in names:
        assert loaded.get_submodule(n).args.num_bits == (8 if "mlp" in n else 4)
        assert torch.equal(loaded.get_submodule(n).codes, model.get_submodule(n).fq_quant.codes)


def test_ignored_block_layers_are_declared(tmp_path: Path) -> None:
    model = tiny_llama()
    names = [n for n in block_linears(model) if "down_proj" not in n]
    quantize(model, args_of(4, 32), names)
    out = fmt.save(model, tmp_path / "g")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert set(qc["dynamic"]) == {rf"-:^model\.layers\.{i}\.mlp\.down_proj$" for i in range(2)}
    assert sorted(qc["modules_in_block_to_quantize"][0]) == sorted(
        {n.split(".", 3)[3] for n in names})
    t = _all_tensors(out)
    assert "model.layers.0.mlp.down_proj.weight" in t and "model.layers.0.mlp.down_proj.qweight" not in t


def test_tied_embeddings_bias_sharding_overwrite(tmp_path: Path) -> None:
    model = quantize(tiny_llama(bias=True), args_of(4, 32), scales_fp16=True)
    out = fmt.save(model, tmp_path / "g", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    t = _all_tensors(out)
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t  # tied: saved once
    b = t["model.layers.0.self_attn.q_proj.bias"]
    assert b.dtype == torch.float16
    assert torch.equal(b, model.model.layers[0].self_attn.q_proj.bias.detach().half())
    before = tree_digest(out)
    with pytest.raises(FileExistsError):
        fmt.save(model, out)
    assert tree_digest(out) == before
    fmt.save(model, out, overwrite=True, max_shard_size=None)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_quantized_lm_head_unties(tmp_path: Path) -> None:
    model = tiny_llama(vocab=128)
    quantize(model, args_of(4, 32), block_linears(model) + ["lm_head"])
    out = fmt.save(model, tmp_path / "g")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["lm_head"] is True
    t = _all_tensors(out)
    assert "lm_head.qweight" in t and "model.embed_tokens.weight" in t and "lm_head.weight" not in t
    loaded = fmt.load(out)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.codes, model.lm_head.fq_quant.codes)


def test_save_without_quantized_modules_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=ATTR):
        fmt.save(tiny_llama(), tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared stories260K not present")
def test_stories260k_tokenizer_files_copied(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES))
    # MLP (172 wide) does not fill GPTQ words at 4 bits: quantize attention only
    quantize(model, args_of(4, 32), [n for n in block_linears(model) if "self_attn" in n])
    out = fmt.save(model, tmp_path / "s")
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (STORIES / f).read_bytes()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("Once upon a time").input_ids == AutoTokenizer.from_pretrained(str(STORIES))("Once upon a time").input_ids


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared stories260K not present")
def test_explicit_tokenizer_object_is_saved(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    model = quantize(tiny_llama(vocab=512), args_of(4, 32))
    out = fmt.save(model, tmp_path / "t", tokenizer=tok)
    assert (out / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(str(out))("a cat").input_ids == tok("a cat").input_ids


def test_save_defaults_to_what_the_model_was_quantized_for(tmp_path: Path) -> None:
    model = quantize(tiny_llama(), args_of(4, 32, False), scales_fp16=True)
    model.fq_target = {"format": "gptq", "checkpoint_format": "gptq_v2", "scale_dtype": torch.float16}
    qc = json.loads((fmt.save(model, tmp_path / "t") / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"]) == ("gptq", "gptq_v2")
    # an explicit argument wins; v1/v2 spellings are the feasibility module's
    qc = json.loads((fmt.save(model, tmp_path / "v1", checkpoint_format="v1") / "config.json")
                    .read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq"
    model.fq_target = {"format": "compressed-tensors", "checkpoint_format": None,
                       "scale_dtype": torch.float32}
    qc = json.loads((fmt.save(model, tmp_path / "c") / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    # another format than the target: that format's own defaults (GPTQ v1)
    qc = json.loads((fmt.save(model, tmp_path / "g", format="gptq") / "config.json")
                    .read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq"
    del model.fq_target
    qc = json.loads((fmt.save(model, tmp_path / "d") / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"]) == ("gptq", "gptq")
    with pytest.raises(ValueError, match="checkpoint_format 'v3'"):
        fmt.save(model, tmp_path / "x", checkpoint_format="v3")


def test_header_check_names_file_and_tensor(tmp_path: Path) -> None:
    from ferroquant.formats import gptq
    from ferroquant.formats.common import CheckpointError, CheckpointFiles

    model = quantize(tiny_llama(), args_of(4, 32))
    out = fmt.save(model, tmp_path / "g")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    files = CheckpointFiles(out)
    name = block_linears(model)[0]
    h = gptq.check_layer_header(files, name, gptq.GPTQSettings.from_config(qc, "config.json"))
    assert (h.bits, h.group_size, h.in_features, h.out_features, h.n_groups) == (4, 32, 64, 64, 2)
    bad = gptq.GPTQSettings.from_config({**qc, "bits": 8}, "config.json")
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}.qweight' has shape \[8, 64\].*bits=8"):
        gptq.check_layer_header(files, name, bad)
    # a v2 config may spell its checkpoint format like the CLI does
    assert gptq.GPTQSettings.from_config({**qc, "checkpoint_format": "v2"}, "c").version == 2
