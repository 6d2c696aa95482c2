"""Perplexity of a causal LM on a text, the way the GPTQ paper measures it.

The whole text is tokenized once (WikiText-2 rows joined by ``"\\n\\n"`` is the standard input),
cut into non-overlapping windows of ``seq_len`` tokens (the tail that does not fill a window is
dropped), each window is run with batch size 1 and the token-weighted mean negative
log-likelihood over all windows is exponentiated. ``stride`` switches to the sliding-window
variant of the Hugging Face perplexity guide (overlapping context, each token scored once).
Works for any module whose forward takes ``input_ids`` and returns ``.logits`` (or a tensor):
float models, models quantized in memory and checkpoints loaded with ``QuantLinear``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["count_windows", "perplexity", "tokenize_text"]


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D ``int64`` ids of ``text`` without special tokens (BOS is the caller's choice)."""
    if not isinstance(text, str):
        raise TypeError(f"perplexity: text must be a str, got {type(text).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def count_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> int:
    """How many forward passes :func:`perplexity` makes over ``n_tokens`` ids."""
    if stride is None or stride >= seq_len:
        return n_tokens // seq_len
    return len(range(0, max(n_tokens - 1, 0), stride))


def _as_ids(tokenizer_or_ids: Any, text: str | None) -> tuple[torch.Tensor, Any]:
    if isinstance(tokenizer_or_ids, torch.Tensor):
        return tokenizer_or_ids.reshape(-1).long().cpu(), None
    if isinstance(tokenizer_or_ids, Sequence) and not isinstance(tokenizer_or_ids, str):
        return torch.as_tensor(list(tokenizer_or_ids), dtype=torch.long).reshape(-1), None
    if text is None:
        raise ValueError("perplexity: a tokenizer was given but no text to evaluate")
    return tokenize_text(tokenizer_or_ids, text), tokenizer_or_ids


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _bos_id(model: torch.nn.Module, tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if bos is None:
        raise ValueError("perplexity: add_bos=True but neither the tokenizer nor the model "
                         "config defines a bos_token_id")
    return int(bos)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer_or_ids: Any,
    text: str | None = None,
    seq_len: int = 2048,
    max_windows: int | None = None,
    stride: int | None = None,
    add_bos: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``text`` (or on pre-tokenized ids).

    Args:
        model: a causal LM; put in eval mode for the duration of the call.
        tokenizer_or_ids: a Hugging Face tokenizer (``text`` is then tokenized without special
            tokens), or the 1-D token ids themselves (``text`` is ignored).
        seq_len: window length in tokens, input tokens included (GPTQ: 2048).
        max_windows: evaluate only the first N windows (fast, and reproducible).
        stride: ``None`` (or ``>= seq_len``) for non-overlapping windows as the GPTQ paper;
            smaller for the sliding-window variant where each window re-reads
            ``seq_len - stride`` tokens of context and scores only the new ones.
        add_bos: prepend BOS to every window (it is context only, never scored); the window
            then holds ``seq_len - 1`` text tokens.
        device: where the windows go; default the device of the model's first parameter.
        progress: show a tqdm bar.

    Returns:
        ``exp(sum of NLL / number of scored tokens)`` as a Python float.
    """
    if seq_len < 2:
        raise ValueError(f"perplexity: seq_len must be >= 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"perplexity: max_windows must be >= 1, got {max_windows}")
    if stride is not None and stride < 1:
        raise ValueError(f"perplexity: stride must be >= 1, got {stride}")
    ids, tokenizer = _as_ids(tokenizer_or_ids, text)
    dev = torch.device(device) if device is not None else _model_device(model)
    bos = _bos_id(model, tokenizer) if add_bos else None
    body = seq_len - 1 if add_bos else seq_len  # text tokens per window

    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise ValueError(f"perplexity: seq_len={seq_len} exceeds the model's "
                         f"max_position_embeddings={max_pos}; pass a smaller seq_len")

    # Each window: (token ids to feed, number of trailing text tokens to score).
    windows: list[tuple[torch.Tensor, int]] = []
    if stride is None or stride >= seq_len:
        for i in range(ids.numel() // body):
            windows.append((ids[i * body:(i + 1) * body], body if add_bos else body - 1))
    else:
        prev_end = 0
        for begin in range(0, max(ids.numel() - 1, 0), stride):
            end = min(begin + body, ids.numel())
            n_new = end - prev_end
            chunk = ids[begin:end]
            # the very first token of the text has no context unless BOS precedes it
            n_score = min(n_new, chunk.numel() if add_bos else chunk.numel() - 1)
            if n_score > 0:
                windows.append((chunk, n_score))
            prev_end = end
            if end == ids.numel():
                break
    if not windows:
        raise ValueError(f"perplexity: the text has {ids.numel()} tokens, fewer than one "
                         f"window of {body}; use a longer text or a smaller seq_len")
    if max_windows is not None:
        windows = windows[:max_windows]

    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_scored = 0
    try:
        bar = tqdm(windows, desc=f"perplexity ({seq_len}-token windows)", unit="win",
                   disable=not progress, leave=False)
        for w, (chunk, n_score) in enumerate(bar):
            inp = chunk if bos is None else torch.cat([chunk.new_tensor([bos]), chunk])
            inp = inp.unsqueeze(0).to(dev)
            out = model(input_ids=inp, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out
            # position t predicts token t+1; score only the last n_score targets
            pred = logits[0, -n_score - 1:-1].float()
            target = inp[0, -n_score:]
            nll = F.cross_entropy(pred, target, reduction="sum").item()
            if not math.isfinite(nll):
                raise FloatingPointError(f"perplexity: window {w} gave a non-finite loss "
                                         f"({nll}); the model produces NaN/Inf logits")
            nll_sum += nll
            n_scored += n_score
            bar.set_postfix(ppl=f"{math.exp(nll_sum / n_scored):.3f}")
    finally:
        model.train(was_training)
    return float(math.exp(nll_sum / n_scored))
