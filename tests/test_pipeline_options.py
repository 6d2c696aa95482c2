"""Pipeline options and failure modes: targets/ignore/regex/config groups, true_sequential,
act-order variants, dtypes, devices, unreached layers, NaN activations, block discovery."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ferroquant import engines, solver
from ferroquant.api import quantize
from ferroquant.api import quantize as run_gptq
from ferroquant.blocks import BlockDiscoveryError, find_blocks
from ferroquant.calibration import from_tensors
from ferroquant.calls import NonFiniteActivationError
from ferroquant.config import GPTQ
from ferroquant.modifiers import UnreachedLayerError

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama(tie: bool = True, layers: int = 2) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib(n: int = 4, seq: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return from_tensors(torch.randint(3, VOCAB, (n, seq), generator=g))


def _quantized(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "fq_quant")}


def _run(model: nn.Module, recipe: GPTQ, **kw):
    return run_gptq(model, recipe, _calib(), show_progress=False, **kw)


# ------------------------------------------------------------------------------------------
# targets, ignore, config groups
# ------------------------------------------------------------------------------------------


def test_ignore_regex_leaves_modules_float() -> None:
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    _run(model, GPTQ(ignore=["lm_head", "re:.*mlp\\..*"]))
    q = _quantized(model)
    assert q and all(".self_attn." in n for n in q)
    assert len(q) == 2 * 4
    for i in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            k = f"model.layers.{i}.mlp.{p}.weight"
            assert torch.equal(model.state_dict()[k], before[k])


def test_regex_targets_select_modules() -> None:
    model = _llama()
    _run(model, GPTQ(targets=["re:.*\\.(q|v)_proj$", "model.layers.1.mlp.down_proj"]))
    assert set(_quantized(model)) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    }


def test_config_groups_give_per_module_schemes() -> None:
    model = _llama()
    recipe = GPTQ(config_groups={
        "attn": {"targets": ["re:.*self_attn\\..*"],
                 "weights": {"num_bits": 3, "symmetric": False, "group_size": 16}},
        "mlp": {"targets": ["re:.*mlp\\..*"],
                "weights": {"num_bits": 8, "strategy": "channel", "group_size": None}},
    })
    rep = _run(model, recipe)
    for r in rep:
        q = model.get_submodule(r.name).fq_quant
        if ".self_attn." in r.name:
            assert (r.bits, r.group_size, q.args.symmetric) == (3, 16, False)
            assert int(q.codes.max()) <= 7 and q.n_groups == q.in_features // 16
        else:
            assert (r.bits, r.group_size) == (8, -1) and q.n_groups == 1
        w = model.get_submodule(r.name).weight
        assert torch.equal(w, q.dequantize(w.dtype))


def test_no_matching_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="no module matched.*quantizable classes there: "
                                         r"\['Linear'\]"):
        _run(_llama(), GPTQ(targets=["re:.*nothing$"]))


def test_explicit_lm_head_on_untied_model() -> None:
    model = _llama(tie=False)
    emb = model.get_input_embeddings().weight.clone()
    rep = _run(model, GPTQ(targets=["Linear", "lm_head"], ignore=[], group_size=16))
    head = [r for r in rep if r.name == "lm_head"]
    assert len(head) == 1 and head[0].block == -1 and head[0].samples == 4 * 32
    assert torch.equal(model.lm_head.weight, model.lm_head.fq_quant.dequantize())
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert rep[-1].name == "lm_head"  # calibrated after every block


# ------------------------------------------------------------------------------------------
# true_sequential and act-order variants
# ------------------------------------------------------------------------------------------


def test_true_sequential_changes_inputs_not_structure() -> None:
    a, b = _llama(), _llama()
    ra = _run(a, GPTQ(true_sequential=True, group_size=16))
    rb = _run(b, GPTQ(true_sequential=False, group_size=16))
    assert [r.name for r in ra] == [r.name for r in rb]
    assert [r.subset for r in ra if r.block == 0] == [0, 0, 0, 1, 2, 2, 3]
    assert {r.subset for r in rb} == {0}
    qa = {n: m.fq_quant for n, m in _quantized(a).items()}
    qb = {n: m.fq_quant for n, m in _quantized(b).items()}
    assert set(qa) == set(qb)
    for n, q in qa.items():
        assert q.codes.shape == qb[n].codes.shape
        assert torch.equal(q.g_idx, qb[n].g_idx)
    # block 0's q/k/v see the same inputs either way: identical results
    for p in ("q_proj", "k_proj", "v_proj"):
        n = f"model.layers.0.self_attn.{p}"
        assert torch.equal(qa[n].codes, qb[n].codes) and torch.equal(qa[n].scales,
                                                                      qb[n].scales)
    # o_proj's inputs carry the q/k/v quantization error only in true-sequential mode
    oa = next(r for r in ra if r.name == "model.layers.0.self_attn.o_proj")
    ob = next(r for r in rb if r.name == "model.layers.0.self_attn.o_proj")
    assert oa.loss != ob.loss


@pytest.mark.parametrize("actorder", ["static", "group", None])
@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "W2A16", "W8A16"])
def test_actorder_and_schemes_are_consistent(actorder, scheme) -> None:
    model = _llama(layers=1)
    rep = _run(model, GPTQ(scheme=scheme, group_size=16, actorder=actorder, observer="mse"))
    bits = {"W4A16_ASYM": 4, "W2A16": 2, "W8A16": 8}[scheme]
    for r in rep:
        mod = model.get_submodule(r.name)
        q = mod.fq_quant
        assert q.args.actorder == actorder and q.args.observer == "mse"
        assert int(q.codes.max()) < 2**bits and int(q.zeros.max()) < 2**bits
        n_in = q.in_features
        if actorder == "group":
            # groups follow the processing order; each holds group_size columns
            counts = torch.bincount(q.g_idx.long(), minlength=q.n_groups)
            assert counts.tolist() == [16] * (n_in // 16)
        else:
            assert torch.equal(q.g_idx.long(), torch.arange(n_in) // 16)
        assert torch.equal(mod.weight, q.dequantize(mod.weight.dtype))


def test_bfloat16_model() -> None:
    model = _llama().to(torch.bfloat16)
    rep = _run(model, GPTQ(group_size=16))
    for r in rep:
        mod = model.get_submodule(r.name)
        assert mod.weight.dtype == torch.bfloat16
        assert torch.equal(mod.weight, mod.fq_quant.dequantize(torch.bfloat16))
    with torch.no_grad():
        out = model(_calib(1).input_ids[0]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_device_argument() -> None:
    model = _llama()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            _run(model, GPTQ(), device="cuda")
        return
    cpu_model = _llama()
    _run(cpu_model, GPTQ(group_size=16))
    rep = _run(model, GPTQ(group_size=16), device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())  # blocks moved back
    for r in rep:
        mod = model.get_submodule(r.name)
        assert torch.equal(mod.weight, mod.fq_quant.dequantize())
        ref = cpu_model.get_submodule(r.name).fq_quant
        # same algorithm, activations computed on another device: nearly the same codes
        assert (mod.fq_quant.codes != ref.codes).float().mean() < 0.05


# ------------------------------------------------------------------------------------------
# failure modes
# ------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)  # never called: no token reaches it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class _Toy(nn.Module):
    """Not a transformers model: blocks in a plain attribute list, no use_cache argument."""

    def __init__(self, d: int = 32, n: int = 2, as_list: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        blocks = [_Block(d) for _ in range(n)]
        if as_list:
            self.stack = nn.ModuleList(blocks)
        else:  # blocks as separate attributes: nothing generic to discover
            for i, b in enumerate(blocks):
                self.add_module(f"b{i}", b)
        self.head = nn.Linear(d, VOCAB)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def _blocks(self) -> list[nn.Module]:
        return list(self.stack) if hasattr(self, "stack") else [self.b0, self.b1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = self.emb(input_ids)
        for b in self._blocks():
            x = b(x)
        return self.head(x)


def test_unreached_layer_policy() -> None:
    torch.manual_seed(0)
    model = _Toy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = _run(model, GPTQ(group_size=16))
    msgs = sorted(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    assert msgs == [f"layer 'stack.{i}.unused': no calibration token reached it: "
                    "round-to-nearest" for i in range(2)]
    by = {r.name: r for r in rep}
    assert by["stack.0.unused"].method == "rtn" and by["stack.0.unused"].samples == 0
    assert "round-to-nearest" in by["stack.0.unused"].note
    assert by["stack.0.fc"].method == "gptq" and by["stack.0.fc"].samples == 4 * 32
    assert "head" not in by
    un = model.stack[1].unused
    assert torch.equal(un.weight, un.fq_quant.dequantize())
    with pytest.raises(UnreachedLayerError, match="'stack.0.unused'"):
        _run(_Toy(), GPTQ(group_size=16, unreached_policy="error"))


def test_block_discovery_errors_and_explicit_paths() -> None:
    model = _Toy(as_list=False)
    with pytest.raises(BlockDiscoveryError, match="(?s)_Toy.*sequential_targets"):
        find_blocks(model)
    blocks = find_blocks(model, ["_Block"])
    assert blocks.names == ["b0", "b1"]
    rep = _run(model, GPTQ(sequential_targets="_Block", group_size=16,
                           unreached_policy="rtn", ignore=["re:.*unused"]))
    assert [r.name for r in rep] == ["b0.fc", "b1.fc"]
    with pytest.raises(BlockDiscoveryError, match="'nope' is neither a submodule path"):
        find_blocks(model, ["nope"])
    with pytest.raises(BlockDiscoveryError, match="'head' is a Linear"):
        find_blocks(model, ["head"])
    llama = _llama()
    assert find_blocks(llama, ["model.layers"]).names == ["model.layers.0", "model.layers.1"]
    assert find_blocks(llama, ["LlamaDecoderLayer"]).names == ["model.layers.0",
                                                                "model.layers.1"]


def test_nan_activations_name_the_layer() -> None:
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(NonFiniteActivationError,
                       match="'model.layers.1.self_attn.q_proj' \\(block model.layers.1\\)"):
        _run(model, GPTQ())
    # NaN leaving a block whose remaining modules are not targets: the block is named
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="outputs of block 'model.layers.1'"):
        _run(model, GPTQ(ignore=["re:.*mlp\\..*"]))
    model = _llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="embeddings"):
        _run(model, GPTQ())


def test_api_accepts_token_tensors_and_preset_names() -> None:
    model = _llama()
    ids = _calib().input_ids
    rep = quantize(model, "W4A16", torch.cat(ids), show_progress=False)
    assert len(rep) == 14 and rep.num_tokens == 4 * 32
    with pytest.raises(TypeError, match="calibration must be"):
        quantize(_llama(), "W4A16", "some text", show_progress=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# shared Hessians of modules fed one tensor
# ------------------------------------------------------------------------------------------


def test_shared_hessians_equal_per_module_hessians(monkeypatch) -> None:
    a, b = _llama(), _llama()
    # the per-sample path (the batched one shares by construction): q/k/v and gate/up share one
    # accumulator per group there unless the grouping is switched off as below
    ra = _run(a, GPTQ(group_size=16), batched=False)

    real_init = engines._SubsetPass.__init__

    def unshared(self, groups, label, share):
        real_init(self, groups, label, False)

    monkeypatch.setattr(engines._SubsetPass, "__init__", unshared)
    rb = _run(b, GPTQ(group_size=16), batched=False)
    for x, y in zip(ra, rb):
        assert x.name == y.name and x.samples == y.samples and x.loss == y.loss
        qa, qb = a.get_submodule(x.name).fq_quant, b.get_submodule(y.name).fq_quant
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales)


class _Branchy(nn.Module):
    """fc_a and fc_b read the same tensor when the sample's first feature is positive (as on
    the probe sample), different tensors otherwise."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc_a = nn.Linear(d, d, bias=False)
        self.fc_b = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x if bool(x[0, 0, 0] > 0) else 2 * x
        return x + 0.1 * (self.fc_a(x) + self.fc_b(xb))


def test_sharing_falls_back_when_inputs_diverge() -> None:
    torch.manual_seed(0)
    d = 32
    model = _Toy(d=d, n=1)
    model.stack = nn.ModuleList([_Branchy(d)])
    with torch.no_grad():
        model.emb.weight[5, 0] = 1.0
        model.emb.weight[6, 0] = -1.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    ids[0, 0], ids[1, 0] = 5, 6
    w_b = model.stack[0].fc_b.weight.detach().clone()
    with torch.no_grad():
        x = model.emb(ids)  # block inputs of both samples
    run_gptq(model, GPTQ(group_size=16, ignore=["head"]), from_tensors(ids),
             show_progress=False)
    # fc_b saw x for sample 0 and 2x for sample 1: its own Hessian, not fc_a's
    acc = solver.HessianAccumulator(d)
    acc.add_batch(x[0:1])
    acc.add_batch(2 * x[1:2])
    ref = solver.gptq_quantize(w_b, acc.hessian(), bits=4, group_size=16, act_order=True,
                               static_groups=True)
    got = model.stack[0].fc_b.fq_quant
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)
