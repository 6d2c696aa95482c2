"""The per-layer quantization report: one :class:`LayerReport` per quantized module and the
:class:`QuantizationReport` list with run-level facts and a printable table."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LayerReport", "QuantizationReport"]


@dataclass
class LayerReport:
    name: str
    block: int  # -1 for modules outside the decoder blocks
    subset: int  # true-sequential subset index inside the block
    out_features: int
    in_features: int
    bits: int
    group_size: int  # -1 = per channel
    symmetric: bool
    actorder: str | None
    method: str  # "gptq" or "rtn" (fallback, see note)
    loss: float  # tr((W-Q) H (W-Q)^T), undamped H; NaN when no Hessian exists
    damp_frac: float  # damping fraction finally used (NaN for rtn)
    damp_attempts: list[float] = field(default_factory=list)
    dead_columns: int = 0
    samples: int = 0  # calibration tokens that reached the layer
    seconds: float = 0.0  # solver time for this layer
    rtn_loss: float | None = None  # same Hessian, round-to-nearest (report_rtn_loss=True)
    note: str = ""


class QuantizationReport(list):
    """A list of :class:`LayerReport` with run-level facts and a printable table."""

    def __init__(self, layers: Iterable[LayerReport] = (), *, seconds: float = 0.0,
                 num_samples: int = 0, num_tokens: int = 0, blocks: str = "",
                 block_paths: list[str] | None = None,
                 phase_seconds: dict[str, float] | None = None) -> None:
        super().__init__(layers)
        self.seconds = seconds
        self.num_samples = num_samples
        self.num_tokens = num_tokens
        self.blocks = blocks
        # per decoder block: "batched" (one stacked pass) or "per-sample" (+ why, if fallen back)
        self.block_paths = list(block_paths or [])
        # wall time by phase: capture, forward (block passes), hessian, solve
        self.phase_seconds = dict(phase_seconds or {})

    @property
    def total_loss(self) -> float:
        return float(sum(r.loss for r in self if not math.isnan(r.loss)))

    def table(self) -> str:
        has_rtn = any(r.rtn_loss is not None for r in self)
        head = ["layer", "shape", "bits/g", "tokens", "damp", "loss"]
        if has_rtn:
            head.append("rtn loss")
        head += ["sec", "method/note"]
        rows = []
        for r in self:
            g = "ch" if r.group_size == -1 else str(r.group_size)
            row = [r.name, f"{r.out_features}x{r.in_features}", f"{r.bits}/{g}", str(r.samples),
                   "-" if math.isnan(r.damp_frac) else f"{r.damp_frac:.3g}", f"{r.loss:.4g}"]
            if has_rtn:
                row.append("-" if r.rtn_loss is None else f"{r.rtn_loss:.4g}")
            row += [f"{r.seconds:.3f}", r.method + (f" ({r.note})" if r.note else "")]
            rows.append(row)
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append(f"{len(self)} layers, total loss {self.total_loss:.6g}, "
                     f"{self.num_samples} samples / {self.num_tokens} tokens, "
                     f"{self.seconds:.1f} s")
        if self.block_paths:
            counts: dict[str, int] = {}
            for p in self.block_paths:
                counts[p] = counts.get(p, 0) + 1
            lines.append("blocks: " + ", ".join(f"{n} {p}" for p, n in counts.items()))
        if self.phase_seconds:
            lines.append("seconds: " + ", ".join(f"{k} {v:.1f}"
                                                 for k, v in self.phase_seconds.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


