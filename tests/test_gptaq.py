"""GPTAQ as a GPTQ recipe option (``gptaq_alpha``): the cross term (X - X~) X~^T streams from the
float-model pairs; a layer whose inputs are unchanged by quantization gets plain GPTQ's weights
exactly, later ones differ; batched and per-sample paths agree."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ferroquant import solver
from ferroquant.calibration import from_tensors
from ferroquant.config import GPTQ
from ferroquant.modifiers import GPTQModifier, QuantizationModifier
from ferroquant.pipeline import SequentialPipeline
from tiny_models import random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _run(model, recipe: GPTQ, *pre, batched: bool = True):
    mods = [*pre, GPTQModifier(recipe)]
    rep = SequentialPipeline(model, mods, show_progress=False, batched=batched).run(
        from_tensors(random_ids(4, 24, seed=3)))
    return _weights(model), rep


def test_the_option_is_off_by_default_and_validated() -> None:
    assert GPTQ().gptaq_alpha is None
    assert not GPTQModifier(GPTQ()).needs_float_inputs
    assert not GPTQModifier(GPTQ(gptaq_alpha=0)).needs_float_inputs
    assert GPTQModifier(GPTQ(gptaq_alpha=0.25)).needs_float_inputs
    with pytest.raises(ValueError, match="gptaq_alpha"):
        GPTQ(gptaq_alpha=-1.0)


def test_unchanged_inputs_give_gptq_exactly_and_later_layers_differ() -> None:
    model = tiny_lm("llama")
    plain, _ = _run(copy.deepcopy(model), GPTQ(group_size=16))
    aq, rep = _run(copy.deepcopy(model), GPTQ(group_size=16, gptaq_alpha=0.25))
    assert {r.method for r in rep} == {"gptaq"}
    for n in plain:
        same = torch.equal(plain[n], aq[n])
        # block 0's q/k/v see the float model's inputs (X == X~, dXX^T == 0): GPTQ's weights
        if ".layers.0." in n and any(p in n for p in ("q_proj", "k_proj", "v_proj")):
            assert same, n
        else:  # everything downstream of a quantized layer moves
            assert not same, n


def test_rtn_upstream_changes_the_result() -> None:
    model = tiny_lm("llama")
    attn = {"group_size": 16, "targets": ["re:.*self_attn.*"]}
    rtn = GPTQ(group_size=16, targets=["re:.*mlp.*"])
    plain, _ = _run(copy.deepcopy(model), GPTQ(**attn), QuantizationModifier(rtn))
    aq, _ = _run(copy.deepcopy(model), GPTQ(**attn, gptaq_alpha=0.25),
                 QuantizationModifier(rtn))
    q1 = "model.layers.1.self_attn.q_proj"
    assert not torch.equal(plain[q1], aq[q1])


def test_batched_and_per_sample_paths_agree() -> None:
    model = tiny_lm("llama")
    a, ra = _run(copy.deepcopy(model), GPTQ(group_size=16, gptaq_alpha=0.25), batched=True)
    b, rb = _run(copy.deepcopy(model), GPTQ(group_size=16, gptaq_alpha=0.25), batched=False)
    assert ra.block_paths == ["batched"] * 2 and rb.block_paths == ["per-sample"] * 2
    for n in a:
        # same codes up to float summation order: compare the dequantized weights
        assert torch.allclose(a[n], b[n], rtol=0, atol=1e-6), n


def test_cross_accumulator_matches_a_direct_sum() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 6, generator=g)
    xq = x + 0.1 * torch.randn(3, 10, 6, generator=g)
    acc, h = solver.CrossAccumulator(6), solver.HessianAccumulator(6)
    for f, q in zip(x, xq, strict=True):
        acc.add_batch(f, q)
        h.add_batch(q)
    f, q = x.reshape(-1, 6).double(), xq.reshape(-1, 6).double()
    n = f.shape[0]
    assert acc.samples == h.samples == n
    torch.testing.assert_close(acc.dxxt().double(), 2 / n * (f - q).T @ q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.hessian().double(), 2 / n * q.T @ q, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        acc.add_batch(x[0], xq[0, :5])
