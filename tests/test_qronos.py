"""Qronos (``GPTQ(qronos=True)``, ``method="qronos"``): the core against an independent float64
implementation of the paper's steps; unchanged inputs give GPTQ bit for bit; the error against
the float model's output drops; the recipe, API and pipeline wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from ferroquant import solver
from ferroquant.api import with_method
from ferroquant.config import GPTQ
from reference_gptq import GridSpec, correlated_activations
from reference_qronos import output_error, qronos_reference, stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layer(seed: int, n: int = 48, rows: int = 16, tokens: int = 400, noise: float = 0.05,
           dead: int | None = None):
    """Float inputs ``x``, quantized-model inputs ``xq`` (x plus noise proportional to each
    feature's spread) and a weight; ``dead``: a column the quantized model never feeds."""
    g = torch.Generator().manual_seed(seed)
    x = correlated_activations(tokens, n, seed=seed)
    xq = x + noise * torch.randn(tokens, n, generator=g) * x.std(0)
    if dead is not None:
        xq[:, dead] = 0
    w = 0.1 * torch.randn(rows, n, generator=g)
    return w, x, xq


def _ours(w, h, g, *, bits, sym, gs, ao, st, block_size=16, **kw):
    return solver.gptq_quantize(w, h.float(), bits=bits, symmetric=sym, group_size=gs,
                                act_order=ao, static_groups=st, block_size=block_size,
                                dxxt=(g - h).float(), qronos=True, **kw)


CASES = [  # (bits, symmetric, group_size, act_order, static_groups)
    (3, True, -1, False, False),
    (3, False, -1, True, False),
    (4, True, 16, True, True),
    (3, True, 16, False, False),
    (3, False, 16, True, False),
    (2, True, 12, False, False),  # groups that do not divide 48 into batches of 16
]


@pytest.mark.parametrize("bits,sym,gs,ao,st", CASES)
@pytest.mark.parametrize("block_size", [16, 128])
def test_matches_the_float64_reference(bits, sym, gs, ao, st, block_size) -> None:
    w, x, xq = _layer(seed=bits * 10 + gs)
    h, g = stats(x, xq)
    ref_q, ref_codes, ties = qronos_reference(w, h, g, GridSpec(bits=bits, symmetric=sym),
                                              group_size=gs, act_order=ao, static_groups=st)
    r = _ours(w, h, g, bits=bits, sym=sym, gs=gs, ao=ao, st=st, block_size=block_size)
    _agree(w, x, xq, r, ref_q, ref_codes, ties)


def _agree(w, x, xq, r, ref_q, ref_codes, ties) -> None:
    """On every row that met no exact rounding tie (at least half of them): equal codes, the
    dequantized weights within 1e-4 (grids fitted on float32 running states), and so the error
    against the float output within 1e-5 relative."""
    keep = ~ties
    assert int(keep.sum()) >= len(ties) // 2
    assert torch.equal(r.codes.double()[keep], ref_codes[keep])
    assert torch.allclose(r.dequantized[keep].double(), ref_q[keep], rtol=1e-4, atol=0)
    e_ref = output_error(w[keep], ref_q[keep], x, xq)
    e = output_error(w[keep], r.dequantized[keep], x, xq)
    assert abs(e / e_ref - 1) < 1e-5, (e, e_ref)


def test_dead_inputs_match_the_reference() -> None:
    w, x, xq = _layer(seed=3, dead=5)
    h, g = stats(x, xq)
    ref_q, ref_codes, ties = qronos_reference(w, h, g, GridSpec(bits=3), group_size=16)
    r = _ours(w, h, g, bits=3, sym=True, gs=16, ao=False, st=False)
    assert r.dead_columns == [5]
    assert (r.dequantized[:, 5] == 0).all()
    _agree(w, x, xq, r, ref_q, ref_codes, ties)


@pytest.mark.parametrize("ao,gs", [(False, -1), (True, 16)])
def test_unchanged_inputs_give_gptq_bit_for_bit(ao, gs) -> None:
    w, x, _ = _layer(seed=5)
    h, g = stats(x, x)
    kw = {"bits": 3, "group_size": gs, "act_order": ao, "block_size": 16}
    q = solver.gptq_quantize(w, h.float(), dxxt=(g - h).float(), qronos=True, **kw)
    p = solver.gptq_quantize(w, h.float(), **kw)
    assert torch.equal(q.codes, p.codes) and torch.equal(q.dequantized, p.dequantized)
    assert q.loss == p.loss


def test_the_float_output_error_drops_against_gptq() -> None:
    """What Qronos is for: ||W X - Q X~|| below GPTQ's (which fits W X~) on every draw."""
    for seed in range(4):
        w, x, xq = _layer(seed=seed, noise=0.1)
        h, g = stats(x, xq)
        kw = {"bits": 3, "group_size": 16, "act_order": True}
        q = solver.gptq_quantize(w, h.float(), dxxt=(g - h).float(), qronos=True, **kw)
        p = solver.gptq_quantize(w, h.float(), **kw)
        assert output_error(w, q.dequantized, x, xq) < 0.97 * output_error(w, p.dequantized, x, xq)


def test_the_core_checks_its_arguments() -> None:
    w, x, xq = _layer(seed=1, n=8, rows=4, tokens=40)
    h, g = stats(x, xq)
    with pytest.raises(ValueError, match="qronos=True needs dxxt"):
        solver.gptq_quantize(w, h.float(), qronos=True)
    bad = (g - h).float()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="layer 'L': qronos: dxxt contains NaN at row 2, column 3"):
        solver.gptq_quantize(w, h.float(), dxxt=bad, qronos=True, name="L")


# ---- recipe, API, pipeline ------------------------------------------------------------------


def test_recipe_option_and_methods() -> None:
    assert GPTQ().qronos is False
    with pytest.raises(ValueError, match="qronos and gptaq_alpha"):
        GPTQ(qronos=True, gptaq_alpha=0.25)
    r = GPTQ(gptaq_alpha=0.5)
    assert with_method(r, "qronos").qronos and with_method(r, "qronos").gptaq_alpha is None
    assert with_method(r, "gptaq").gptaq_alpha == 0.5
    assert with_method(GPTQ(), "gptaq").gptaq_alpha == 0.25
    plain = with_method(GPTQ(qronos=True), "gptq")
    assert not plain.qronos and plain.gptaq_alpha is None
    assert with_method(r, None) is r and with_method(r, "rtn") is r


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_in_the_pipeline() -> None:
    pytest.importorskip("transformers")
    from ferroquant import api
    from tiny_models import random_ids, tiny_lm

    model = tiny_lm("llama")
    ids = random_ids(4, 24, seed=3)
    plain, qr = copy.deepcopy(model), copy.deepcopy(model)
    api.quantize(plain, GPTQ(group_size=16), ids, method="gptq", device="cpu",
                 show_progress=False)
    rep = api.quantize(qr, GPTQ(group_size=16), ids, method="qronos", device="cpu",
                       show_progress=False)
    assert {r.method for r in rep} == {"qronos"}
    assert qr.fq_recipe.qronos
    assert rep.phase_seconds.get("float forward", 0) > 0
    a, b = _weights(plain), _weights(qr)
    for n in a:
        same = torch.equal(a[n], b[n])
        # block 0's q/k/v see the float model's inputs: GPTQ's weights bit for bit
        if ".layers.0." in n and any(p in n for p in ("q_proj", "k_proj", "v_proj")):
            assert same, n
        else:
            assert not same, n
    # the batched and per-sample paths agree
    ps = copy.deepcopy(model)
    rep2 = api.quantize(ps, GPTQ(group_size=16, qronos=True), ids, device="cpu",
                        show_progress=False, batched=False)
    assert rep2.block_paths == ["per-sample"] * 2
    c = _weights(ps)
    for n in b:
        assert torch.allclose(b[n], c[n], rtol=0, atol=1e-6), n


# ---- the Hessian-weighted scale search beside it ----------------------------------------------


def test_hessian_mse_is_a_weight_observer_only() -> None:
    from ferroquant.config import ActivationArgs, QuantizationArgs

    assert QuantizationArgs(observer="hessian_mse").observer == "hessian_mse"
    assert GPTQ(observer="hessian_mse").resolved_groups()
    with pytest.raises(ValueError, match="'hessian_mse' is for weights"):
        ActivationArgs(num_bits=8, observer="hessian_mse")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_qronos_with_the_weighted_search_saves_exactly(tmp_path, fmt: str) -> None:
    """Qronos + ``hessian_mse`` on a bfloat16 model: saved, loaded, the weights and logits are
    the solved model's; compressed-tensors records the observer."""
    pytest.importorskip("transformers")
    import json

    import ferroquant as fq
    from tiny_models import random_ids, tiny_lm

    model = tiny_lm("llama")
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    rep = fq.quantize(model, {"scheme": "W4A16", "group_size": 16, "observer": "hessian_mse",
                              "qronos": True}, random_ids(4, 24, seed=11), format=fmt,
                      show_progress=False)
    assert {r.method for r in rep} == {"qronos"}
    fq.save(model, tmp_path / "ckpt")
    loaded = fq.load(tmp_path / "ckpt")
    for name, mod in model.named_modules():
        if getattr(mod, "fq_quant", None) is not None:
            assert torch.equal(loaded.get_submodule(name).dequantize(mod.weight.dtype),
                               mod.weight), name
    ids = random_ids(2, 16, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if fmt == "compressed-tensors":
        qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
        assert {g["weights"]["observer"] for g in qc["config_groups"].values()} == {"hessian_mse"}
