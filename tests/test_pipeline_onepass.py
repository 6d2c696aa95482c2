"""The batched one-pass block path against the per-sample path it replaces.

Both paths accumulate each layer's Hessian sample by sample in the same order and run the same
row-independent kernels, so on these tiny models they agree bit for bit: identical codes,
scales, losses, subsets and token counts, and identical quantized-model outputs. That makes the
comparison a test of the semantics (true-sequential: each layer's Hessian sees every upstream
layer quantized; non-true-sequential: Hessians of the float block), not of a tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ferroquant import memory
from ferroquant.api import quantize as run_gptq
from ferroquant.calibration import CalibrationSet, from_tensors
from ferroquant.calls import NonFiniteActivationError
from ferroquant.config import GPTQ
from tiny_models import ToyLM, random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same(a: nn.Module, ra: list, b: nn.Module, rb: list) -> None:
    assert [r.name for r in ra] == [r.name for r in rb] and len(ra) > 0
    for x, y in zip(ra, rb):
        assert (x.block, x.subset, x.samples, x.method) == (y.block, y.subset, y.samples,
                                                            y.method), x.name
        assert abs(x.loss - y.loss) <= 1e-4 * abs(y.loss), (x.name, x.loss, y.loss)
        qa, qb = a.get_submodule(x.name).fq_quant, b.get_submodule(y.name).fq_quant
        assert torch.equal(qa.codes, qb.codes), x.name
        assert torch.equal(qa.scales, qb.scales) and torch.equal(qa.zeros, qb.zeros), x.name
        assert torch.equal(a.get_submodule(x.name).weight, b.get_submodule(y.name).weight)


def _run_both(model: nn.Module, recipe: GPTQ, calib: CalibrationSet):
    a, b = model, copy.deepcopy(model)
    ra = run_gptq(a, recipe, calib, show_progress=False, batched=True)
    rb = run_gptq(b, recipe, calib, show_progress=False, batched=False)
    return a, ra, b, rb


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_one_pass_equals_per_sample_path(arch: str, true_sequential: bool) -> None:
    ids = random_ids(5, 24, seed=1)
    recipe = GPTQ(group_size=16, true_sequential=true_sequential)
    a, ra, b, rb = _run_both(tiny_lm(arch), recipe, from_tensors(ids))
    assert ra.block_paths == ["batched"] * 2 and rb.block_paths == ["per-sample"] * 2
    _assert_same(a, ra, b, rb)
    # q/k/v (c_attn), o, gate/up (fc1, c_fc), down: execution-order subsets, or one subset
    assert max(r.subset for r in ra) == (3 if true_sequential else 0)
    assert all(r.samples == ids.numel() for r in ra)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert "2 batched" in ra.table()
    assert set(ra.phase_seconds) >= {"capture", "forward", "hessian", "solve"}


def test_true_sequential_changes_the_result() -> None:
    # the one-pass trick is true-sequential: without it the Hessians see float upstream layers
    ids = random_ids(4, 24, seed=2)
    m1 = tiny_lm("llama")
    m2 = copy.deepcopy(m1)
    r1 = run_gptq(m1, GPTQ(group_size=16), from_tensors(ids), show_progress=False, batched=True)
    r2 = run_gptq(m2, GPTQ(group_size=16, true_sequential=False), from_tensors(ids),
                  show_progress=False, batched=True)
    by2 = {r.name: r for r in r2}
    first = r1[0].name  # q_proj of block 0 sees the embeddings either way
    assert r1[0].loss == by2[first].loss
    assert any(r.loss != by2[r.name].loss for r in r1 if r.block == 0 and r.subset > 0)


def test_padding_masks_that_differ_are_stacked() -> None:
    # each sample masks a different tail: per-sample 4-D masks differ and are concatenated
    ids = random_ids(4, 24, seed=3)
    masks = torch.ones_like(ids)
    for s in range(4):
        masks[s, 24 - 2 * (s + 1):] = 0
    calib = CalibrationSet(input_ids=[ids[s:s + 1] for s in range(4)],
                           attention_mask=[masks[s:s + 1] for s in range(4)], seq_len=24,
                           requested_samples=4)
    a, ra, b, rb = _run_both(tiny_lm("llama"), GPTQ(group_size=16), calib)
    assert ra.block_paths == ["batched"] * 2
    _assert_same(a, ra, b, rb)


def _hessians(monkeypatch, model: nn.Module, calib: CalibrationSet, **kw) -> tuple[dict, list]:
    """Every layer's Hessian (and token count) as the GPTQ modifier solves it."""
    from ferroquant.modifiers import GPTQModifier

    seen: dict[str, tuple[torch.Tensor, int]] = {}
    real = GPTQModifier.on_module_ready

    def spy(self, t, subset):
        seen[t.name] = (t.state.core.hessian().clone(), t.state.samples)
        return real(self, t, subset)

    monkeypatch.setattr(GPTQModifier, "on_module_ready", spy)
    rep = run_gptq(model, GPTQ(group_size=16), calib, show_progress=False, **kw)
    monkeypatch.undo()
    return seen, rep.block_paths


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_ragged_samples_are_padded_into_one_batched_pass(monkeypatch, arch: str) -> None:
    ids = random_ids(3, 32, seed=4)
    calib = from_tensors([ids[0:1, :32], ids[1:2, :20], ids[2:3, :27]])
    model = tiny_lm(arch)
    ha, paths_a = _hessians(monkeypatch, copy.deepcopy(model), calib)  # auto: padded, batched
    hb, paths_b = _hessians(monkeypatch, copy.deepcopy(model), calib, batched=False)
    assert paths_a == ["batched"] * 2 and paths_b == ["per-sample"] * 2
    assert sorted(ha) == sorted(hb)
    for name, (h, n) in ha.items():
        # pad positions reach no Hessian: the same tokens, the same sums up to float rounding
        # (attention over a padded length sums in another order)
        assert n == hb[name][1] == 32 + 20 + 27, name
        torch.testing.assert_close(h, hb[name][0], rtol=1e-4, atol=1e-6, msg=name)
    # the first layers see the embeddings' norm: row-wise arithmetic, identical
    first = next(iter(ha))
    assert torch.equal(ha[first][0], hb[first][0])


def test_ragged_samples_on_a_padded_batch_fall_back_as_one_call() -> None:
    # a block that cannot take the one-pass path keeps the padded batch as one call
    torch.manual_seed(0)
    ids = random_ids(3, 16, seed=5)
    calib = from_tensors([ids[0:1, :16], ids[1:2, :9], ids[2:3, :12]])
    model = ToyLM()
    ref = copy.deepcopy(model)
    recipe = GPTQ(group_size=16, ignore=["head"])
    ra = run_gptq(model, recipe, calib, show_progress=False, batched=True)
    rb = run_gptq(ref, recipe, calib, show_progress=False, batched=False)
    assert all(p.startswith("chunks of 3 (") and "runs more than once" in p
               for p in ra.block_paths)
    for x, y in zip(ra, rb):
        assert x.samples == y.samples == 16 + 9 + 12
        assert abs(x.loss - y.loss) <= 1e-4 * abs(y.loss), x.name


def test_module_called_twice_rolls_back_and_falls_back() -> None:
    torch.manual_seed(0)
    model = ToyLM()
    recipe = GPTQ(group_size=16, ignore=["head"])
    calib = from_tensors(random_ids(3, 16, seed=5))
    a, ra, b, rb = _run_both(model, recipe, calib)
    # fc1 was solved in the batched pass before fc2's second call: that was undone
    assert all("runs more than once" in p for p in ra.block_paths)
    _assert_same(a, ra, b, rb)  # the per-sample path's handling, whatever it is
    # not a transformers model: auto mode keeps the per-sample path
    rep = run_gptq(ToyLM(), recipe, calib, show_progress=False)
    assert rep.block_paths == ["per-sample"] * 2


def test_auto_mode_respects_memory(monkeypatch) -> None:
    calib = from_tensors(random_ids(3, 16, seed=6))
    rep = run_gptq(tiny_lm("llama"), GPTQ(group_size=16), calib, show_progress=False)
    assert rep.block_paths == ["batched"] * 2
    monkeypatch.setattr(memory, "available_memory", lambda dev: 1 << 16)
    rep = run_gptq(tiny_lm("llama"), GPTQ(group_size=16), calib, show_progress=False)
    assert rep.block_paths == ["per-sample"] * 2


def test_chunks_when_all_samples_do_not_fit(monkeypatch) -> None:
    # budget (half the "available" memory) for 2 of 5 samples: subset passes over chunks
    monkeypatch.setattr(memory, "batch_bytes",
                        lambda blocks, hiddens, heads: 1000 * len(hiddens))
    monkeypatch.setattr(memory, "available_memory", lambda dev: 4 * 1000 + 1)
    ids = random_ids(5, 24, seed=7)
    m = tiny_lm("llama")
    ref = copy.deepcopy(m)
    rep = run_gptq(m, GPTQ(group_size=16), from_tensors(ids), show_progress=False)
    assert rep.block_paths == ["chunks of 2"] * 2
    rb = run_gptq(ref, GPTQ(group_size=16), from_tensors(ids), show_progress=False,
                  batched=False)
    _assert_same(m, rep, ref, rb)


def test_nan_activation_names_layer_and_block() -> None:
    model = tiny_lm("llama")
    norm = model.model.layers[1].post_attention_layernorm

    def plant(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[-1, 5, 7] = float("nan")  # the last sample only
        return out

    norm.register_forward_hook(plant)
    with pytest.raises(NonFiniteActivationError,
                       match="'model.layers.1.mlp.gate_proj' \\(block model.layers.1\\)"):
        run_gptq(model, GPTQ(group_size=16), from_tensors(random_ids(3, 16)), show_progress=False,
                 batched=True)

    # NaN in a block's output (no target after it): the block and the sample are named
    model = tiny_lm("llama")

    def plant_out(module: nn.Module, inputs: tuple, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[0] == 1:  # input capture runs block 0 on one sample: leave that alone
            return out
        h = h.clone()
        h[2, 3, 1] = float("inf")
        return (h, *out[1:]) if isinstance(out, tuple) else h

    model.model.layers[0].register_forward_hook(plant_out)
    with pytest.raises(NonFiniteActivationError,
                       match="outputs of block 'model.layers.0' for sample 2"):
        run_gptq(model, GPTQ(group_size=16), from_tensors(random_ids(3, 16)), show_progress=False,
                 batched=True)
