"""The float stream: a modifier with ``needs_float_inputs`` gets, beside each target's inputs X~
in the partly quantized model, the float model's inputs X of the same tokens. A test modifier
sums G = X X~^T, H = X~ X~^T and F = X X^T per target; they are checked against the float and
the quantized models run by hand, and between the batched, padded, chunked and per-sample
paths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ferroquant import memory
from ferroquant.api import quantize
from ferroquant.calibration import CalibrationSet, from_tensors
from ferroquant.config import GPTQ
from ferroquant.modifiers import Target, WeightModifier
from ferroquant.pipeline import SequentialPipeline
from ferroquant.report import LayerReport
from tiny_models import ToyLM, random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PairStats(WeightModifier):
    """Sums G, H and F in float64 from the pairs the pipeline hands it; then quantizes each
    target round-to-nearest (``quantize``) or leaves it float."""

    needs_inputs = True
    needs_float_inputs = True
    sequential = True

    def __init__(self, recipe: GPTQ, quantize: bool = True) -> None:
        super().__init__(recipe)
        self.quantize = quantize
        self.stats: dict[str, dict] = {}

    def new_core_state(self, t: Target, x: torch.Tensor) -> dict:
        d = x.shape[-1]
        return {k: torch.zeros(d, d, dtype=torch.float64) for k in "GHF"} | {
            "tokens": 0, "same": True, "dtype": None}

    def add_float_pairs(self, t: Target, state, float_rows, quant_rows, label: str) -> None:
        c = state.core
        for x, xq in zip(float_rows, quant_rows, strict=True):
            a, b = x.double(), xq.double()
            c["G"] += a.T @ b
            c["H"] += b.T @ b
            c["F"] += a.T @ a
            c["tokens"] += int(x.shape[0])
            c["same"] = c["same"] and torch.equal(x, xq)
            c["dtype"] = x.dtype

    def on_module_ready(self, t: Target, subset: int) -> LayerReport:
        self.stats[t.name] = t.state.core | {"samples": t.state.samples}
        if self.quantize:
            return self.quantize_rtn(t, subset)
        t.state = None
        nan = math.nan
        return LayerReport(t.name, t.block, subset, 0, 0, 0, -1, True, None, "none", nan, nan)


def _run(model: nn.Module, calib: CalibrationSet, quantize: bool = True, **kw):
    mod = PairStats(GPTQ(group_size=16), quantize)
    rep = SequentialPipeline(model, [mod], show_progress=False, **kw).run(calib)
    return mod.stats, rep


def _inputs(model: nn.Module, calib: CalibrationSet, names: list[str]) -> dict[str, list]:
    """Every named module's input rows, per sample and call, running ``model`` by hand."""
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: seen[n].append(i[0].detach().reshape(-1, i[0].shape[-1]).double()))
        for n in names]
    try:
        with torch.no_grad():
            for ids, mask in zip(calib.input_ids, calib.attention_mask):
                model(ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    err = float((a - b).abs().max())
    assert err <= rtol * float(b.abs().max()), (what, err, float(b.abs().max()))


def _calib(n: int = 4, seq: int = 24, seed: int = 1) -> CalibrationSet:
    return from_tensors(random_ids(n, seq, seed=seed))


def test_the_float_stream_pairs_with_the_quantized_one_exactly() -> None:
    # (e) G by hand: RTN weights do not depend on the data, so each target's X~ is its input
    # in the float model with every target quantized before it swapped for its RTN weight
    calib = _calib()
    model = tiny_lm("llama")
    ref = copy.deepcopy(model)
    stats, rep = _run(model, calib, batched=True)
    assert rep.block_paths == ["batched"] * 2
    order = [r.name for r in rep]
    assert sorted(order) == sorted(stats) and len(order) == 14
    floats = _inputs(ref, calib, order)
    hand = copy.deepcopy(ref)
    for name in order:
        xq = _inputs(hand, calib, [name])[name]
        x = floats[name]
        s = stats[name]
        assert s["tokens"] == s["samples"] == calib.num_tokens, name
        _close(s["F"], sum(a.T @ a for a in x), f"{name} F")
        _close(s["H"], sum(b.T @ b for b in xq), f"{name} H")
        _close(s["G"], sum(a.T @ b for a, b in zip(x, xq)), f"{name} G")
        hand.get_submodule(name).weight.data.copy_(model.get_submodule(name).weight)
    # (a) block 0's first modules see no quantization yet: X == X~ bit for bit
    first = stats["model.layers.0.self_attn.q_proj"]
    assert first["same"] and torch.equal(first["G"], first["H"])
    assert stats["model.layers.0.self_attn.v_proj"]["same"]  # fed the same tensor as q
    # (b) after a quantized module, the float stream differs from the quantized one
    assert not stats["model.layers.0.self_attn.o_proj"]["same"]
    for name, s in stats.items():
        if ".layers.1." in name:
            assert not s["same"] and not torch.allclose(s["G"], s["H"]), name
    assert rep.phase_seconds["float forward"] > 0


@pytest.mark.parametrize("batched", [True, False])
def test_quantizing_nothing_keeps_both_streams_equal(batched: bool) -> None:
    calib = _calib(3)
    model = tiny_lm("llama")
    ref = copy.deepcopy(model)
    stats, _ = _run(model, calib, quantize=False, batched=batched)
    floats = _inputs(ref, calib, list(stats))
    for name, s in stats.items():
        assert s["same"] and torch.equal(s["G"], s["H"]) and torch.equal(s["G"], s["F"]), name
        _close(s["F"], sum(a.T @ a for a in floats[name]), name)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p1, p2), n1


def _same_stats(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert a[name]["tokens"] == b[name]["tokens"] == b[name]["samples"], name
        for k in "GHF":
            _close(a[name][k], b[name][k], f"{name} {k}")


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_batched_and_per_sample_paths_agree(arch: str) -> None:
    # (c)
    calib = _calib(4)
    model = tiny_lm(arch)
    sa, ra = _run(copy.deepcopy(model), calib, batched=True)
    sb, rb = _run(model, calib, batched=False)
    assert ra.block_paths == ["batched"] * 2 and rb.block_paths == ["per-sample"] * 2
    _same_stats(sa, sb)


def test_ragged_samples_keep_pads_out_of_the_pairs() -> None:
    # (d) samples of different lengths run as one right-padded batch
    ids = random_ids(3, 32, seed=4)
    calib = from_tensors([ids[0:1, :32], ids[1:2, :20], ids[2:3, :27]])
    model = tiny_lm("llama")
    sa, ra = _run(copy.deepcopy(model), calib)
    sb, rb = _run(model, calib, batched=False)
    assert ra.block_paths == ["batched"] * 2 and rb.block_paths == ["per-sample"] * 2
    assert all(s["tokens"] == 32 + 20 + 27 for s in sa.values())
    _same_stats(sa, sb)


def test_the_float_stream_memory_is_reserved_and_chunks_agree(monkeypatch) -> None:
    # budget: half the "available" memory, less half the float stream's; a stacked pass of 5
    # samples fits without the float stream, 2 at a time with it
    widths = []

    def reserve(hiddens, width):
        widths.append(width)
        return 6000

    monkeypatch.setattr(memory, "batch_bytes", lambda blocks, hiddens, heads: 1000 * len(hiddens))
    monkeypatch.setattr(memory, "available_memory", lambda dev: 2 * 5000 + 2)
    monkeypatch.setattr(memory, "float_stream_bytes", reserve)
    calib = _calib(5)
    model = tiny_lm("opt")
    rep = quantize(copy.deepcopy(model), GPTQ(group_size=16), calib, show_progress=False)
    assert rep.block_paths == ["batched"] * 2 and not widths
    sa, ra = _run(copy.deepcopy(model), calib)
    assert ra.block_paths == ["chunks of 2"] * 2
    assert widths == [4 * 64 + 96 + 64]  # q, k, v, out_proj, fc1 (64 each); fc2 (96)
    sb, _ = _run(model, calib, batched=False)
    _same_stats(sa, sb)


def test_a_module_run_twice_pairs_call_by_call() -> None:
    # the batched pass is rolled back for the per-subset path; each call of a module pairs
    # with the float model's same call
    torch.manual_seed(0)
    model = ToyLM()
    ref = copy.deepcopy(model)
    calib = from_tensors(random_ids(3, 16, seed=5))
    stats, rep = _run(model, calib, batched=True)
    assert all("runs more than once" in p for p in rep.block_paths)
    first = stats["stack.0.fc1"]
    assert first["same"] and torch.equal(first["G"], first["H"])
    assert not stats["stack.1.fc1"]["same"]
    floats = _inputs(ref, calib, ["stack.0.fc1", "stack.1.fc1"])
    for name in ("stack.0.fc1", "stack.1.fc1"):
        _close(stats[name]["F"], sum(a.T @ a for a in floats[name]), name)
    for s in stats.values():
        assert s["tokens"] == s["samples"] > 0


def test_forward_dtype_runs_the_float_stream_in_it() -> None:
    calib = _calib(3)
    stats, rep = _run(tiny_lm("llama"), calib, batched=True, forward_dtype="bfloat16")
    assert {s["dtype"] for s in stats.values()} == {torch.bfloat16}
    first = stats["model.layers.0.self_attn.q_proj"]
    assert first["same"] and torch.equal(first["G"], first["H"])
    assert not stats["model.layers.1.mlp.down_proj"]["same"]
    assert "float forward" in rep.phase_seconds


def test_modules_quantized_at_block_start_stay_out_of_the_float_stream() -> None:
    # round-to-nearest quantizes the MLPs before each block's passes: after the float pass
    from ferroquant.modifiers import QuantizationModifier

    calib = _calib(3)
    model = tiny_lm("llama")
    ref = copy.deepcopy(model)
    rtn = QuantizationModifier(GPTQ(group_size=16, targets=["re:.*mlp.*"]))
    pairs = PairStats(GPTQ(group_size=16, targets=["re:.*self_attn.*"]))
    SequentialPipeline(model, [rtn, pairs], show_progress=False, batched=True).run(calib)
    names = [n for n in pairs.stats if ".layers.1." in n]
    floats = _inputs(ref, calib, names)
    for name in names:
        _close(pairs.stats[name]["F"], sum(a.T @ a for a in floats[name]), name)
        assert not pairs.stats[name]["same"], name


@pytest.mark.parametrize("batched", [True, False])
def test_without_true_sequential_a_block_sees_only_upstream_blocks_quantized(
        monkeypatch, batched: bool) -> None:
    # statistics of the float block first, then its modules quantized: in block 0 X == X~
    monkeypatch.setattr(PairStats, "sequential", False)
    stats, _ = _run(tiny_lm("llama"), _calib(3), batched=batched)
    assert len(stats) == 14
    for name, s in stats.items():
        assert s["same"] == (".layers.0." in name), name


def test_targets_outside_the_blocks_are_refused() -> None:
    mod = PairStats(GPTQ(group_size=16, targets=["Linear", "lm_head"], ignore=[]))
    with pytest.raises(ValueError, match="'lm_head' is outside the decoder blocks"):
        SequentialPipeline(tiny_lm("llama"), [mod], show_progress=False).run(_calib(2))


def test_other_modifiers_run_no_float_stream(monkeypatch) -> None:
    from ferroquant import floats

    def never(*a, **k):
        raise AssertionError("float pass without a modifier needing it")

    monkeypatch.setattr(floats, "float_pass", never)
    monkeypatch.setattr("ferroquant.pipeline.float_pass", never)
    rep = quantize(tiny_lm("llama"), GPTQ(group_size=16), _calib(2), show_progress=False)
    assert "float forward" not in rep.phase_seconds
