"""Group-aware reordering (``actorder: group_aware``, GPTQModel's ``act_group_aware``): whole
groups in turn by descending max diag(H), columns of a group by descending diag(H), grids fitted
when a group starts; ``g_idx`` stays trivial. Checked as plain GPTQ on the reordered layer (an
independent order computed here), against the float64 reference, and through a checkpoint."""

from __future__ import annotations

import pytest
import torch
from ferroquant import solver
from reference_gptq import GridSpec, correlated_activations, gptq_reference, proxy_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layer(cols: int, seed: int = 0, rows: int = 24):
    x = correlated_activations(3 * cols, cols, seed=seed).double()
    h = ((2.0 / x.shape[0]) * (x.T @ x)).float()
    w = 0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return w, h


def _gar_order(diag: torch.Tensor, g: int) -> torch.Tensor:
    n = diag.numel()
    key = torch.where(diag == 0, torch.ones_like(diag), diag)
    full = n // g
    tops = torch.stack([key[k * g:(k + 1) * g].max() for k in range(full)])
    groups = torch.argsort(tops, descending=True, stable=True).tolist()
    if n % g:
        groups.append(full)  # the ragged group last
    out = []
    for k in groups:
        idx = torch.arange(k * g, min((k + 1) * g, n))
        out.append(idx[torch.argsort(key[idx], descending=True, stable=True)])
    return torch.cat(out)


@pytest.mark.parametrize("cols,g,bits,sym", [(172, 32, 3, True), (576, 64, 4, False),
                                             (576, 128, 2, True)])
def test_is_plain_gptq_on_the_reordered_layer(cols, g, bits, sym) -> None:
    w, h = _layer(cols, seed=cols + g)
    r = solver.gptq_quantize(w, h, bits=bits, symmetric=sym, group_size=g, act_order=True,
                             group_aware=True)
    perm = _gar_order(torch.diag(h), g)
    assert torch.equal(r.perm, perm)
    assert torch.equal(r.g_idx.long(), torch.arange(cols) // g)
    p = solver.gptq_quantize(w[:, perm], h[perm][:, perm], bits=bits, symmetric=sym,
                             group_size=g, act_order=False)
    assert torch.equal(r.codes[:, perm], p.codes)
    assert torch.equal(r.dequantized[:, perm], p.dequantized)
    natural = perm[torch.arange(0, cols, g)] // g  # processing group k is original group natural[k]
    assert torch.equal(r.scales[:, natural], p.scales) and torch.equal(r.zeros[:, natural], p.zeros)
    gi = r.g_idx.long()
    torch.testing.assert_close(r.dequantized, r.scales[:, gi] * (r.codes.float() - r.zeros[:, gi]),
                               rtol=1e-6, atol=0)
    # and the float64 reference on the reordered layer (blocks of one group: its grids then see
    # the exact state)
    ref = gptq_reference(w[:, perm], h[perm][:, perm], GridSpec(bits=bits, symmetric=sym),
                         group_size=g, block_size=g)
    ours = proxy_loss(w, r.dequantized, h)
    theirs = proxy_loss(w[:, perm], ref.dequantized, h[perm][:, perm])
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_options_are_checked() -> None:
    w, h = _layer(64)
    with pytest.raises(ValueError, match="group_aware reorders the columns: it needs act_order"):
        solver.gptq_quantize(w, h, group_size=16, group_aware=True)
    with pytest.raises(ValueError, match="group_aware and static_groups"):
        solver.gptq_quantize(w, h, group_size=16, act_order=True, static_groups=True,
                             group_aware=True)
    # per channel there are no groups: plain act-order
    a = solver.gptq_quantize(w, h, act_order=True, group_aware=True)
    b = solver.gptq_quantize(w, h, act_order=True)
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_checkpoint_holds_the_solved_model(tmp_path, fmt: str) -> None:
    pytest.importorskip("transformers")
    import json

    import ferroquant as fq
    from tiny_models import random_ids, tiny_lm

    model = tiny_lm("llama")
    rep = fq.quantize(model, {"scheme": "W4A16", "group_size": 16, "actorder": "group_aware"},
                      random_ids(4, 24, seed=11), format=fmt, show_progress=False)
    assert {r.actorder for r in rep} == {"group_aware"}
    fq.save(model, tmp_path / "ckpt")
    loaded = fq.load(tmp_path / "ckpt")
    for name, mod in model.named_modules():
        q = getattr(mod, "fq_quant", None)
        if q is not None:
            assert torch.equal(q.g_idx.long(), torch.arange(q.g_idx.numel()) // 16), name
            assert torch.equal(loaded.get_submodule(name).dequantize(mod.weight.dtype),
                               mod.weight), name
    ids = random_ids(2, 16, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if fmt == "compressed-tensors":  # a loader sees static act-order (trivial g_idx)
        qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
        assert {g["weights"]["actorder"] for g in qc["config_groups"].values()} == {"static"}


def test_combines_with_qronos_and_the_weighted_search() -> None:
    """Qronos + group_aware + hessian_mse in the pipeline: grids stay in natural groups (the
    modifier refuses a permuted g_idx under group_aware), and the result differs from Qronos
    with plain static act-order."""
    pytest.importorskip("transformers")
    import copy

    import ferroquant as fq
    from tiny_models import random_ids, tiny_lm

    model = tiny_lm("llama")
    ids = random_ids(4, 24, seed=11)
    got = {}
    for order in ("group_aware", "static"):
        m = copy.deepcopy(model)
        fq.quantize(m, {"scheme": "W4A16", "group_size": 16, "actorder": order,
                        "observer": "hessian_mse", "qronos": True}, ids, show_progress=False)
        got[order] = {n: mod.fq_quant for n, mod in m.named_modules()
                      if getattr(mod, "fq_quant", None) is not None}
    for name, q in got["group_aware"].items():
        assert torch.equal(q.g_idx.long(), torch.arange(q.g_idx.numel()) // 16), name
    assert any(not torch.equal(q.codes, got["static"][n].codes)
               for n, q in got["group_aware"].items())
