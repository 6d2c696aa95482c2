"""The block pipeline on tiny random models of every supported architecture (transformers 5.x):
captured block inputs reproduce the model's own forward, and quantization covers exactly the
decoder Linear/Conv1D layers with weights equal to their stored codes."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ferroquant import solver
from ferroquant.api import quantize as run_gptq
from ferroquant.blocks import find_blocks, is_quantizable, linear_weight
from ferroquant.calibration import from_tensors
from ferroquant.calls import call_block as _call_block
from ferroquant.calls import capture_block_inputs
from ferroquant.config import GPTQ

VOCAB = 96
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _configs() -> dict[str, object]:
    T = transformers
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "max_position_embeddings": 128, **IDS}
    llama_like = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, **common)
    return {
        "llama": (T.LlamaConfig, llama_like),
        "qwen2": (T.Qwen2Config, llama_like),
        "qwen3": (T.Qwen3Config, {**llama_like, "head_dim": 16}),
        "mistral": (T.MistralConfig, {**llama_like, "sliding_window": 16}),
        "gemma": (T.GemmaConfig, {**llama_like, "head_dim": 16}),
        "phi3": (T.Phi3Config, llama_like),
        "opt": (T.OPTConfig, {"hidden_size": 64, "ffn_dim": 96, "num_attention_heads": 4,
                              "word_embed_proj_dim": 64, **common}),
        "gpt2": (T.GPT2Config, {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB,
                                "n_positions": 128, "bos_token_id": 1, "eos_token_id": 2}),
        # per-layer attention masks (sliding window 8 < 32 tokens) and rotary tables
        "gemma3": (T.Gemma3TextConfig, {**llama_like, "head_dim": 16, "num_hidden_layers": 3,
                                        "sliding_window": 8,
                                        "layer_types": ["sliding_attention", "full_attention",
                                                        "sliding_attention"]}),
    }


ARCHS = list(_configs())
BLOCK_PATHS = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}
LLAMA_SUBSETS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
# true-sequential subsets of one block, found from execution order and shared inputs
SUBSETS = {
    "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"],
             ["mlp.down_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(arch: str) -> torch.nn.Module:
    cls, kw = _configs()[arch]
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cls(**kw))
    return m.eval()


def _ids(n: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_inputs_reproduce_the_forward(arch: str) -> None:
    model = _model(arch)
    blocks = find_blocks(model)
    assert blocks.path == BLOCK_PATHS.get(arch, "model.layers")
    ids = _ids(2, 32, seed=1)
    calib = from_tensors(ids)
    with torch.no_grad():
        hiddens, calls = capture_block_inputs(model, blocks, calib)
        for s in range(len(calib)):
            ref = model(ids[s:s + 1], output_hidden_states=True, use_cache=False).hidden_states
            h = hiddens[s]
            assert torch.equal(h, ref[0])
            # block i run on block i's captured arguments gives block i+1's input
            for i, block in enumerate(blocks.modules[:-1]):
                h = _call_block(block, h, calls[i][s])
                torch.testing.assert_close(h, ref[i + 1], rtol=1e-5, atol=1e-5)
    for c in calls[0]:
        assert c.kwargs.get("use_cache", False) is False
        assert c.kwargs.get("past_key_values") is None


def _rtn_copy(model: torch.nn.Module, args_by_name: dict) -> torch.nn.Module:
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if name in args_by_name:
            a = args_by_name[name]
            w, transposed = linear_weight(mod)
            r = solver.rtn_quantize(w, bits=a.num_bits, symmetric=a.symmetric,
                                    group_size=a.effective_group_size)
            mod.weight.data.copy_(r.dequantized.t() if transposed else r.dequantized)
    return m


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_tiny_model(arch: str) -> None:
    model = _model(arch)
    float_model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = find_blocks(model)
    expected = {n for bn, b in zip(blocks.names, blocks.modules)
                for n, m in b.named_modules(prefix=bn) if is_quantizable(m)}
    assert expected

    calib = from_tensors(_ids(6, 32, seed=2))
    recipe = GPTQ(scheme="W4A16", group_size=16)
    rep = run_gptq(model, recipe, calib, show_progress=False, report_rtn_loss=True)

    quantized = {n for n, m in model.named_modules() if hasattr(m, "fq_quant")}
    assert quantized == expected == {r.name for r in rep}
    for name, mod in model.named_modules():
        if name not in expected:
            continue
        q = mod.fq_quant
        w, transposed = linear_weight(mod)
        assert transposed == (arch == "gpt2")
        assert q.codes.shape == w.shape and q.codes.dtype == torch.uint8
        assert int(q.codes.max()) <= 15
        # static act-order keeps groups contiguous: g_idx is trivial
        assert torch.equal(q.g_idx.long(), torch.arange(w.shape[1]) // 16)
        assert torch.equal(w, q.dequantize(w.dtype)), name
        assert not torch.equal(w, before[name + ".weight"].t() if transposed
                               else before[name + ".weight"])
    # everything that is not a quantized weight is untouched (embeddings, norms, lm_head, bias)
    after = model.state_dict()
    for k, v in before.items():
        if k.rsplit(".", 1)[0] not in expected or not k.endswith("weight"):
            assert torch.equal(after[k], v), k

    prefix = blocks.names[1] + "."
    got_subsets: dict[int, list[str]] = {}
    for r in rep:
        if r.name.startswith(prefix):
            got_subsets.setdefault(r.subset, []).append(r.name[len(prefix):])
    assert list(got_subsets.values()) == SUBSETS.get(arch, LLAMA_SUBSETS)
    for r in rep:
        assert r.method == "gptq" and r.samples == calib.num_tokens and r.damp_frac >= 0.01
        assert r.loss >= 0 and r.rtn_loss is not None
    assert rep.total_loss < sum(r.rtn_loss for r in rep)

    # the quantized model stays usable and closer to the float model than round-to-nearest
    rtn = _rtn_copy(float_model, {r.name: model.get_submodule(r.name).fq_quant.args
                                  for r in rep})
    held_out = _ids(4, 32, seed=3)
    with torch.no_grad():
        ref = float_model(held_out).logits
        got = model(held_out).logits
        base = rtn(held_out).logits
    assert torch.isfinite(got).all()
    assert (got - ref).pow(2).mean() < (base - ref).pow(2).mean()
    assert model.fq_recipe is recipe and model.fq_report is rep


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_forward_on_every_arch(arch: str) -> None:
    """``forward_dtype="bfloat16"`` on a float32 model of each architecture: the same layers in
    the same subsets, float32 weights holding their codes exactly, nothing else touched, and a
    proxy loss close to the float32 calibration's."""
    ref, model = _model(arch), _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = from_tensors(_ids(6, 32, seed=2))
    r32 = run_gptq(ref, GPTQ(scheme="W4A16", group_size=16), calib, show_progress=False)
    r16 = run_gptq(model, GPTQ(scheme="W4A16", group_size=16, forward_dtype="bfloat16"), calib,
                   show_progress=False)
    assert [(r.name, r.subset, r.samples) for r in r16] == \
        [(r.name, r.subset, r.samples) for r in r32]
    assert r16.total_loss == pytest.approx(r32.total_loss, rel=0.1)
    names = {r.name for r in r16}
    for name in names:
        mod = model.get_submodule(name)
        w, _ = linear_weight(mod)
        assert w.dtype == torch.float32 and torch.equal(w, mod.fq_quant.dequantize(w.dtype))
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        if k.rsplit(".", 1)[0] not in names or not k.endswith("weight"):
            assert torch.equal(after[k], v), k
