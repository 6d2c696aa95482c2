"""End to end on the real stories260K Llama with TinyStories text: GPTQ beats round-to-nearest
on the per-layer proxy loss (same Hessians) and on held-out perplexity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from ferroquant import calibration, solver
from ferroquant.api import quantize
from ferroquant.blocks import linear_weight
from ferroquant.config import GPTQ
from ferroquant.report import LayerReport, QuantizationReport
from shared_data import DATA

MODEL = DATA / "models" / "stories260K"
TINY = DATA / "text" / "tinystories_valid_30k.txt"

pytestmark = [
    pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/data is not available"),
    pytest.mark.usefixtures("one_torch_thread"),
]

SEQ = 256


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def float_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def split(tok):
    """Calibration stories and held-out evaluation ids (disjoint halves of the file)."""
    stories = [s.strip() for s in TINY.read_text(encoding="utf-8").splitlines() if s.strip()]
    half = len(stories) // 2
    calib = calibration.from_texts(stories[:half], tok, num_samples=16, seq_len=SEQ)
    ids: list[int] = []
    for s in stories[half:]:
        ids += [tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]
    return calib, torch.tensor(ids)


def _ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    n = ids.numel() // SEQ
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x = ids[i * SEQ:(i + 1) * SEQ].unsqueeze(0)
            logits = model(x).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), x[0, 1:], reduction="sum").item()
            count += SEQ - 1
    return math.exp(nll / count)


def _rtn(model: torch.nn.Module, rep: QuantizationReport) -> torch.nn.Module:
    m = copy.deepcopy(model)
    for r in rep:
        mod = m.get_submodule(r.name)
        w, _ = linear_weight(mod)
        q = solver.rtn_quantize(w, bits=r.bits, symmetric=r.symmetric, group_size=r.group_size)
        mod.weight.data.copy_(q.dequantized)
    return m


@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_beats_rtn_on_stories260k(float_model, split, group_size: int) -> None:
    calib, held_out = split
    model = copy.deepcopy(float_model)
    emb_before = model.get_input_embeddings().weight.clone()
    rep = quantize(model, GPTQ(scheme="W4A16", group_size=group_size), calib,
                   show_progress=False, report_rtn_loss=True)

    # 5 blocks x (q, k, v, o, gate, up, down); lm_head (tied to the embeddings) untouched
    assert len(rep) == 35 and all(isinstance(r, LayerReport) for r in rep)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not hasattr(model.lm_head, "fq_quant")
    for r in rep:
        mod = model.get_submodule(r.name)
        assert torch.equal(mod.weight, mod.fq_quant.dequantize(mod.weight.dtype))
        assert r.samples == calib.num_tokens == 16 * SEQ
        # GPTQ minimizes this very loss; RTN on the same Hessian is the baseline
        assert r.loss <= r.rtn_loss * 1.0001, r.name
    gptq_loss, rtn_loss = rep.total_loss, sum(r.rtn_loss for r in rep)
    assert gptq_loss < 0.85 * rtn_loss

    ppl_float = _ppl(float_model, held_out)
    ppl_gptq = _ppl(model, held_out)
    ppl_rtn = _ppl(_rtn(float_model, rep), held_out)
    print(f"group {group_size}: float {ppl_float:.3f}  rtn {ppl_rtn:.3f}  gptq {ppl_gptq:.3f}  "
          f"(proxy loss gptq {gptq_loss:.3f} rtn {rtn_loss:.3f})")
    assert ppl_float < ppl_gptq < ppl_rtn
    # GPTQ recovers a real share of what rounding loses, not a rounding-noise margin
    assert ppl_gptq - ppl_float < 0.75 * (ppl_rtn - ppl_float)

    table = rep.table()
    assert all(r.name in table for r in rep) and "rtn loss" in table
    assert model.fq_report is rep and model.fq_recipe.group_size == group_size


def test_recipe_forms_and_tied_lm_head(float_model, split, tmp_path) -> None:
    calib, _ = split
    small = calibration.CalibrationSet(calib.input_ids[:2], calib.attention_mask[:2], SEQ, 2)
    path = GPTQ(scheme="W8A16", group_size=64, true_sequential=False).to_file(tmp_path / "r.yaml")
    for recipe in (path, str(path), {"scheme": "W8A16", "group_size": 64,
                                     "true_sequential": False}):
        model = copy.deepcopy(float_model)
        rep = quantize(model, recipe, small, show_progress=False)
        assert model.fq_recipe == GPTQ.from_file(path)
        assert {r.bits for r in rep} == {8} and {r.subset for r in rep} == {0}
    # lm_head shares the embedding matrix: quantizing it would silently change the embeddings
    model = copy.deepcopy(float_model)
    with pytest.raises(ValueError, match="'lm_head' shares its weight with the input embed"):
        quantize(model, GPTQ(targets=["Linear", "lm_head"], ignore=[]), small,
                 show_progress=False)
    # the default ignore list wins over an explicit lm_head target
    model = copy.deepcopy(float_model)
    quantize(model, GPTQ(targets=["Linear", "lm_head"]), small, show_progress=False)
    assert not hasattr(model.lm_head, "fq_quant")
