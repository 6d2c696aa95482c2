"""Quantized codes of fixed runs, as digests: the fixture ``fixtures/codes.json`` written by one
commit and compared by ``test_codes_fixture.py`` on a later one, so a refactor of the pipeline
is shown to leave every code, scale, zero and ``g_idx`` as it was.

Scales are compared as float32 bytes, so the runs keep float32 scale storage (a float32 model
saved as compressed-tensors): storage-dtype rounding is a deliberate change of its own.

Regenerate (only when a change of results is intended and explained):
``python tests/codes_fixture.py tests/fixtures/codes.json``
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_data import STORIES, TEXT
from tiny_models import random_ids, tiny_lm

# name -> (model, recipe dict, calibration, batched)
CASES: dict[str, dict[str, Any]] = {
    "llama-g16-batched": {"model": "llama", "recipe": {"group_size": 16}, "batched": True},
    "llama-g16-per-sample": {"model": "llama", "recipe": {"group_size": 16}, "batched": False},
    "llama-asym-g32-no-true-seq": {
        "model": "llama", "batched": True,
        "recipe": {"scheme": "W4A16_ASYM", "group_size": 32, "true_sequential": False}},
    "opt-w3-channel-actorder-group": {
        "model": "opt", "batched": True,
        "recipe": {"scheme": "W3A16", "group_size": -1, "actorder": "group"}},
    "gpt2-w8-g16-mse": {
        "model": "gpt2", "batched": True,
        "recipe": {"scheme": "W8A16", "group_size": 16, "observer": "mse"}},
    "llama-g16-bf16-forward": {
        "model": "llama", "batched": True,
        "recipe": {"group_size": 16, "forward_dtype": "bfloat16"}},
    "stories260K-w4-channel": {"model": "stories260K", "recipe": {"group_size": -1},
                               "batched": None},
    "stories260K-w3-g32-asym": {
        "model": "stories260K", "batched": None,
        "recipe": {"scheme": "W4A16_ASYM", "group_size": 32}},
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _model_and_calib(kind: str) -> tuple[torch.nn.Module, Any]:
    from ferroquant import calibration

    if kind == "stories260K":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(STORIES)
        text = (TEXT / "tinystories_valid_30k.txt").read_text(encoding="utf-8")
        return model, calibration.from_texts(text, tok, num_samples=8, seq_len=128)
    return tiny_lm(kind), calibration.from_tensors(random_ids(5, 24, seed=7))


def available(case: str) -> bool:
    return CASES[case]["model"] != "stories260K" or STORIES.is_dir()


def run_case(case: str, **quantize_kwargs: Any) -> dict[str, dict[str, str]]:
    """``{layer: {codes, scales, zeros, g_idx}}`` digests of one case."""
    import ferroquant as fq

    spec = CASES[case]
    recipe = {k: v for k, v in spec["recipe"].items() if v is not None}
    model, calib = _model_and_calib(spec["model"])
    torch.set_num_threads(1)
    fq.quantize(model, recipe, calib, show_progress=False, batched=spec["batched"],
                **quantize_kwargs)
    out = {}
    for name, m in model.named_modules():
        q = getattr(m, "fq_quant", None)
        if q is not None:
            out[name] = {k: _digest(getattr(q, k).cpu())
                         for k in ("codes", "scales", "zeros", "g_idx")}
    return out


def main(path: str) -> None:
    data = {case: run_case(case) for case in CASES if available(case)}
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(data)} cases to {path}")


if __name__ == "__main__":
    main(sys.argv[1])
