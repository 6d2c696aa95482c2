"""The memory plan of a calibration run: how many samples one block call can stack."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from .blocks import Blocks, is_quantizable, linear_weight

__all__ = ["attention_heads", "available_memory", "batch_bytes", "batching_plan",
           "float_stream_bytes"]


def available_memory(dev: torch.device) -> int | None:
    """Bytes that can still be allocated on ``dev`` (None if unknown)."""
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def attention_heads(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for k in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def batch_bytes(blocks: Blocks, hiddens: list[torch.Tensor], heads: int | None) -> int:
    """Rough peak activation memory of one block pass over all samples stacked: a few live
    tensors as wide as the widest layer, plus attention scores should the attention kernel
    materialize them."""
    n = sum(int(h.shape[0]) for h in hiddens)
    seq, d = max(int(h.shape[-2]) for h in hiddens), int(hiddens[0].shape[-1])
    el = hiddens[0].element_size()
    width = d
    for b in blocks.modules:
        for m in b.modules():
            if is_quantizable(m):
                width = max(width, *linear_weight(m)[0].shape)
    h = heads or max(1, d // 64)
    return n * seq * (6 * width + 4 * d) * el + 2 * n * h * seq * seq * max(el, 4)


def float_stream_bytes(hiddens: list[torch.Tensor], record_width: int) -> int:
    """Rough memory the float stream holds through a block's calibration, whichever path it
    takes: its hidden states in and out, and the inputs recorded for the block's targets
    (``record_width``: their input features per token, each module counted - an upper bound
    where modules share one input)."""
    n = sum(int(h.shape[0]) for h in hiddens)
    seq, d = max(int(h.shape[-2]) for h in hiddens), int(hiddens[0].shape[-1])
    return n * seq * (2 * d + record_width) * hiddens[0].element_size()


def batching_plan(model: nn.Module, blocks: Blocks, hiddens: list[torch.Tensor],
                   dev: torch.device, batched: bool | None, reserved: int = 0
                   ) -> tuple[int, str]:
    """(samples stacked per block call, why) for this run: all of them = the one-pass path
    (samples of different lengths right-padded to the longest); fewer = the subset-by-subset
    path over chunks; 1 = sample by sample. ``reserved``: bytes held on ``dev`` whatever the
    path (the float stream), taken from the memory a stacked pass may use."""
    n = len(hiddens)
    if batched is not None:
        return (n, "batched=True") if batched else (1, "batched=False")
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        # stacking samples assumes the block treats batch rows independently, which holds
        # for transformers' decoder layers; arbitrary modules may branch on their input
        return 1, "not a transformers model (pass batched=True to stack samples anyway)"
    need = batch_bytes(blocks, hiddens, attention_heads(model))
    avail = available_memory(dev)
    gib = 1 << 30
    if avail is None:
        budget, have = 2 * gib, "free memory unknown, limit 2 GiB"
    else:
        budget, have = avail // 2, f"{avail / gib:.1f} GiB available, limit half"
    if reserved:
        budget -= reserved // 2
        have += f", less half of ~{reserved / gib:.2f} GiB for the float stream"
    ragged = len({tuple(h.shape) for h in hiddens}) != 1
    if ragged and need > budget:
        return 1, (f"samples of different lengths: ~{need / gib:.2f} GiB of activations padded "
                   f"to the longest, {have}")
    k = n if need <= budget else max(1, min(n - 1, int(n * budget // max(need, 1))))
    return k, (f"~{need / gib:.2f} GiB of activations for all samples"
               f"{' (padded to the longest)' if ragged else ''}, {have}")
