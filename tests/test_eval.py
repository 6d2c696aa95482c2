"""Perplexity (ferroquant.eval) on the real stories260K model and TinyStories text.

The anchor is the number the data README publishes for this model and text: 5.55 with 30
non-overlapping 512-token windows, no BOS, fp32. The other checks compare against references
computed independently through transformers' own ``labels=`` loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from ferroquant.eval import count_windows, perplexity, tokenize_text
from shared_data import DATA

STORIES = DATA / "models" / "stories260K"
TINY_TEXT = DATA / "text" / "tinystories_valid_30k.txt"

pytestmark = pytest.mark.skipif(not STORIES.is_dir() or not TINY_TEXT.is_file(),
                                reason="../shared/data (stories260K, TinyStories) not present")


@pytest.fixture(scope="module")
def stories(one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    return model, tok


@pytest.fixture(scope="module")
def text() -> str:
    return TINY_TEXT.read_text(encoding="utf-8")


def _hf_window_ppl(model, windows: list[torch.Tensor], labels: list[torch.Tensor] | None = None
                   ) -> float:
    """exp(token-weighted mean NLL) through transformers' labels= loss (mean per window)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, w in enumerate(windows):
            lab = w if labels is None else labels[i]
            loss = model(input_ids=w.unsqueeze(0), labels=lab.unsqueeze(0)).loss.item()
            n = int((lab[1:] != -100).sum())
            total += loss * n
            count += n
    return math.exp(total / count)


def test_published_stories260k_perplexity(stories, text):
    model, tok = stories
    ids = tokenize_text(tok, text)
    assert count_windows(ids.numel(), 512) == 30  # the README's 30 windows
    ppl = perplexity(model, tok, text, seq_len=512, progress=False)
    assert ppl == pytest.approx(5.55, abs=0.01)


def test_matches_transformers_loss_and_ids_input(stories, text):
    model, tok = stories
    ids = tokenize_text(tok, text)
    # no special tokens: the stream starts with the text itself, not BOS
    assert int(ids[0]) != tok.bos_token_id
    windows = [ids[i * 256:(i + 1) * 256] for i in range(3)]
    ref = _hf_window_ppl(model, windows)
    got_text = perplexity(model, tok, text, seq_len=256, max_windows=3, progress=False)
    got_ids = perplexity(model, ids, seq_len=256, max_windows=3, progress=False)
    assert got_text == pytest.approx(ref, rel=1e-5)
    assert got_ids == got_text


def test_add_bos_scores_every_text_token(stories, text):
    model, tok = stories
    ids = tokenize_text(tok, text)
    bos = torch.tensor([tok.bos_token_id])
    # each window: BOS + 255 text tokens; all 255 are predicted (the first one from BOS alone)
    windows = [torch.cat([bos, ids[i * 255:(i + 1) * 255]]) for i in range(3)]
    ref = _hf_window_ppl(model, windows)
    got = perplexity(model, tok, text, seq_len=256, max_windows=3, add_bos=True,
                     progress=False)
    assert got == pytest.approx(ref, rel=1e-5)


def test_sliding_window_scores_each_token_once_with_more_context(stories, text):
    model, tok = stories
    ids = tokenize_text(tok, text)[:1024]
    # stride >= seq_len is the non-overlapping evaluation
    assert perplexity(model, ids, seq_len=256, stride=256, progress=False) == \
        perplexity(model, ids, seq_len=256, progress=False)
    # stride 128: windows [0,256) then [128,384) scoring only 256..383, ...: reference built
    # with transformers' loss and -100 labels on the re-read context
    windows, labels = [], []
    prev_end = 0
    for begin in range(0, ids.numel() - 1, 128):
        end = min(begin + 256, ids.numel())
        w = ids[begin:end]
        lab = w.clone()
        lab[: w.numel() - (end - prev_end)] = -100
        windows.append(w)
        labels.append(lab)
        prev_end = end
        if end == ids.numel():
            break
    ref = _hf_window_ppl(model, windows, labels)
    got = perplexity(model, ids, seq_len=256, stride=128, progress=False)
    assert got == pytest.approx(ref, rel=1e-5)
    # every token after the first is scored exactly once
    assert sum(int((lab[1:] != -100).sum()) for lab in labels) == ids.numel() - 1
    # more context per scored token: lower perplexity than the non-overlapping windows
    assert got < perplexity(model, ids, seq_len=256, progress=False)


def test_bad_arguments_are_named(stories):
    model, tok = stories
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "once upon a time", seq_len=256, progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, torch.zeros(2000, dtype=torch.long), seq_len=1024, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, torch.zeros(600, dtype=torch.long), seq_len=256, max_windows=0)
    with pytest.raises(ValueError, match="no text"):
        perplexity(model, tok, None, seq_len=256)


def test_non_finite_logits_are_reported(stories):
    model, _ = stories

    class Broken(torch.nn.Module):
        config = model.config

        def forward(self, input_ids, **_):
            out = torch.zeros(*input_ids.shape, 512)
            out[..., 3] = float("nan")
            return out

    with pytest.raises(FloatingPointError, match="window 0"):
        perplexity(Broken(), torch.arange(300) % 512, seq_len=256, progress=False)


def test_restores_training_mode(stories):
    model, _ = stories
    model.train()
    try:
        perplexity(model, torch.arange(300) % 512, seq_len=256, progress=False)
        assert model.training
    finally:
        model.eval()


def test_shipped_texts_are_substantial_and_disjoint():
    from ferroquant.models import shipped_text

    calib = shipped_text("calibration").read_text(encoding="utf-8")
    held = shipped_text("heldout").read_text(encoding="utf-8")
    assert 25_000 <= len(calib.encode()) <= 45_000
    assert 8_000 <= len(held.encode()) <= 15_000

    def shingles(t: str, k: int = 6) -> set[tuple[str, ...]]:
        words = t.lower().split()
        return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}

    # held-out means held out: no 6-word run of the evaluation text occurs in calibration
    assert not shingles(held) & shingles(calib)
