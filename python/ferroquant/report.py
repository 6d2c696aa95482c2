"""The per-layer quantization report: one :class:`LayerReport` per quantized module and the
:class:`QuantizationReport` list with run-level facts, a printable table, a short summary and
the files (text, CSV and an SVG picture) a run leaves next to its checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = ["LOSS_DEFINITION", "LayerReport", "QuantizationReport"]

LOSS_DEFINITION = (
    "loss = tr((W-Q) H (W-Q)^T), the proxy error GPTQ minimises: W the float weight, Q the "
    "quantized one, H = (2/n) sum x x^T over the layer's n calibration inputs x; the total is "
    "the sum over layers (lower is better; comparable between runs on the same model and "
    "calibration set)."
)


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
    activations: str = ""  # its input/output activation schemes, e.g. "input int8 per-token ..."


class QuantizationReport(list):
    """A list of :class:`LayerReport` with run-level facts and a printable table."""

    def __init__(self, layers: Iterable[LayerReport] = (), *, seconds: float = 0.0,
                 num_samples: int = 0, num_tokens: int = 0, blocks: str = "",
                 block_paths: list[str] | None = None,
                 phase_seconds: dict[str, float] | None = None,
                 kv_cache: str = "") -> None:
        super().__init__(layers)
        self.seconds = seconds
        self.num_samples = num_samples
        self.num_tokens = num_tokens
        self.blocks = blocks
        # per decoder block: "batched" (one stacked pass) or "per-sample" (+ why, if fallen back)
        self.block_paths = list(block_paths or [])
        # wall time by phase: capture, forward (block passes), hessian, solve
        self.phase_seconds = dict(phase_seconds or {})
        # what the KV cache became, e.g. "fp8 per-tensor static (symmetric) on 30 attention modules"
        self.kv_cache = kv_cache

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

    @property
    def total_rtn_loss(self) -> float | None:
        """Round-to-nearest's total on the same Hessians (None unless every GPTQ layer has it)."""
        solved = [r for r in self if not math.isnan(r.loss)]
        if not solved or any(r.rtn_loss is None for r in solved):
            return None
        return float(sum(r.rtn_loss for r in solved if r.rtn_loss is not None))

    def summary(self, worst: int = 5) -> str:
        """A few lines instead of the full table: counts and time, the total loss (and what it
        is), round-to-nearest's total when known, the share of each layer kind and the
        ``worst`` layers by loss."""
        methods: dict[str, int] = {}
        for r in self:
            methods[r.method] = methods.get(r.method, 0) + 1
        blocks = len({r.block for r in self if r.block >= 0})
        lines = [f"{len(self)} layers in {blocks} blocks ("
                 + ", ".join(f"{n} {m}" for m, n in methods.items()) + "), "
                 f"{self.num_samples} samples / {self.num_tokens} tokens, {self.seconds:.1f} s"
                 + (" (" + ", ".join(f"{k} {v:.1f}" for k, v in self.phase_seconds.items()) + ")"
                    if self.phase_seconds else "")]
        total, rtn = self.total_loss, self.total_rtn_loss
        line = f"total loss {total:.4g}"
        if rtn is not None and total > 0:
            line += f"; round-to-nearest on the same Hessians: {rtn:.4g} ({rtn / total:.2f}x)"
        lines.append(line)
        lines += textwrap.wrap(LOSS_DEFINITION, 98, initial_indent="  ", subsequent_indent="  ")
        kinds = _by_kind(self)
        if total > 0 and len(kinds) > 1:
            sums = sorted(((sum(r.loss for r in rs if not math.isnan(r.loss)), k)
                           for k, rs in kinds.items()), reverse=True)
            lines += textwrap.wrap("share of the total by layer kind: "
                                   + ", ".join(f"{k} {100 * v / total:.0f}%" for v, k in sums),
                                   100, subsequent_indent="  ")
        ranked = sorted((r for r in self if not math.isnan(r.loss)), key=lambda r: -r.loss)
        if ranked and worst > 0:
            lines.append(f"worst {min(worst, len(ranked))} layers:")
            w = max(len(r.name) for r in ranked[:worst])
            for r in ranked[:worst]:
                row = f"  {r.name.ljust(w)}  loss {r.loss:.4g}"
                if total > 0:
                    row += f" ({100 * r.loss / total:.1f}%)"
                if r.rtn_loss is not None:
                    row += f", round-to-nearest {r.rtn_loss:.4g}"
                lines.append(row)
        acts: dict[str, int] = {}
        for r in self:
            if r.activations:
                acts[r.activations] = acts.get(r.activations, 0) + 1
        lines += [f"activations: {a} on {n} layers" for a, n in acts.items()]
        if self.kv_cache:
            lines.append(f"KV cache: {self.kv_cache}")
        raised = [r.name for r in self if len(r.damp_attempts) > 1]
        if raised:
            lines.append(f"damping raised on {len(raised)} layers: " + ", ".join(raised[:5])
                         + (", ..." if len(raised) > 5 else ""))
        noted = [r for r in self if r.note]
        for r in noted[:5]:
            lines.append(f"{r.name}: {r.note}")
        if len(noted) > 5:
            lines.append(f"... and {len(noted) - 5} more layers with notes (see the table)")
        return "\n".join(lines)

    def write(self, directory: str | Path, stem: str = "quantization_report") -> dict[str, Path]:
        """Writes the full table as text (``{stem}.txt``) and CSV (``{stem}.csv``, one row per
        layer, every :class:`LayerReport` field) and the picture of the per-layer loss by block,
        GPTQ against round-to-nearest (``{stem}.svg``); returns the paths by extension."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {ext: d / f"{stem}.{ext}" for ext in ("txt", "csv", "svg")}
        paths["txt"].write_text(self.summary() + "\n\n" + self.table() + "\n", encoding="utf-8")
        names = [f.name for f in dataclasses.fields(LayerReport)]
        with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(names)
            for r in self:
                row = dataclasses.asdict(r)
                row["damp_attempts"] = ";".join(repr(x) for x in r.damp_attempts)
                row["rtn_loss"] = "" if r.rtn_loss is None else repr(r.rtn_loss)
                row["actorder"] = r.actorder or ""
                out.writerow([repr(v) if isinstance(v, float) else v
                              for v in (row[n] for n in names)])
        paths["svg"].write_text(self.svg(), encoding="utf-8")
        return paths

    def svg(self) -> str:
        """The per-layer loss by block as an SVG picture: one panel per layer kind
        (``self_attn.q_proj``, ``mlp.down_proj``, ...), the block index across, the loss on a
        log scale up, GPTQ as a solid line and round-to-nearest on the same Hessians dashed."""
        return _svg(self)


# ------------------------------------------------------------------------------------------
# the picture, written by hand (no plotting dependency)

_GPTQ_COLOR, _RTN_COLOR = "#1f5fa8", "#d9661f"


def _kind(r: LayerReport) -> str:
    """The layer's name inside its block with expert/list indices as ``*``
    (``model.layers.3.mlp.experts.7.down_proj`` -> ``mlp.experts.*.down_proj``)."""
    parts = r.name.split(".")
    if r.block >= 0 and str(r.block) in parts:
        parts = parts[parts.index(str(r.block)) + 1:]
    return ".".join("*" if p.isdigit() else p for p in parts) or r.name


def _by_kind(layers: Iterable[LayerReport]) -> dict[str, list[LayerReport]]:
    out: dict[str, list[LayerReport]] = {}
    for r in layers:
        out.setdefault(_kind(r), []).append(r)
    return out


def _series(layers: list[LayerReport], rtn: bool) -> dict[int, float]:
    """Loss per block (summed where a kind has several layers in a block, e.g. experts);
    blocks with a missing, NaN or non-positive value are left out (no point on a log scale)."""
    out: dict[int, float] = {}
    bad: set[int] = set()
    for r in layers:
        v = r.rtn_loss if rtn else r.loss
        if v is None or not math.isfinite(v):
            bad.add(r.block)
            continue
        out[r.block] = out.get(r.block, 0.0) + v
    return {b: v for b, v in out.items() if b not in bad and v > 0}


def _fmt_tick(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if b - a >= 3 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in range(a, b + 1) for m in mults]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else [lo, hi]


def _x_step(n: int) -> int:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500):
        if n / step <= 8:
            return step
    return max(1, n // 8)


def _svg(report: QuantizationReport) -> str:
    kinds = _by_kind(r for r in report if r.block >= 0)
    has_rtn = any(r.rtn_loss is not None for r in report)
    cols = 1 if len(kinds) <= 1 else 2 if len(kinds) <= 4 else 3
    rows = max(1, math.ceil(len(kinds) / cols))
    pw, ph = 320, 200  # panel size, axes inside
    ml, mr, mt, mb = 62, 12, 28, 34  # panel margins: tick labels left, title top, x label below
    head = 78
    width, height = cols * pw + 20, head + rows * ph + 10
    el: list[str] = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" '
         'font-size="11">'),
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<text x="10" y="22" font-size="15" font-weight="bold">Per-layer loss by block: '
        + ("GPTQ against round-to-nearest" if has_rtn else "GPTQ") + "</text>",
    ]
    total, rtn = report.total_loss, report.total_rtn_loss
    sub = f"total loss {total:.4g}"
    if rtn is not None and total > 0:
        sub += f", round-to-nearest {rtn:.4g} ({rtn / total:.2f}x)"
    elif not has_rtn:
        sub += "; round-to-nearest not computed (quantize with report_rtn_loss=True)"
    el.append(f'<text x="10" y="40">{escape(sub)}; loss = tr((W-Q) H (W-Q)^T), log scale, '
              "lower is better</text>")
    # legend
    lx = 10
    for label, color, dash in (("GPTQ", _GPTQ_COLOR, ""),
                               ("round-to-nearest", _RTN_COLOR, ' stroke-dasharray="5,3"')):
        if label != "GPTQ" and not has_rtn:
            break
        el.append(f'<line x1="{lx}" y1="58" x2="{lx + 24}" y2="58" stroke="{color}" '
                  f'stroke-width="2"{dash}/>')
        el.append(f'<text x="{lx + 30}" y="62">{label}</text>')
        lx += 40 + 7 * len(label)
    if not kinds:
        el.append(f'<text x="10" y="{head + 20}">no layer inside a decoder block</text>')
    n_blocks = max((r.block for r in report if r.block >= 0), default=0) + 1
    for i, (kind, layers) in enumerate(kinds.items()):
        ox, oy = 10 + (i % cols) * pw, head + (i // cols) * ph
        x0, x1, y0, y1 = ox + ml, ox + pw - mr, oy + mt, oy + ph - mb
        g, r_ = _series(layers, rtn=False), _series(layers, rtn=True) if has_rtn else {}
        per_block = max(sum(1 for r in layers if r.block == b) for b in {r.block for r in layers})
        title = kind + (f" (sum of {per_block} per block)" if per_block > 1 else "")
        gsum = sum(g.values())
        both = [b for b in g if b in r_]
        if both and gsum > 0:
            ratio = sum(r_[b] for b in both) / sum(g[b] for b in both)
            title += f"  RTN/GPTQ {ratio:.2f}x"
        el.append(f'<text x="{x0}" y="{oy + 18}" font-weight="bold">{escape(title)}</text>')
        el.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" '
                  'stroke="#999"/>')
        vals = list(g.values()) + list(r_.values())
        if not vals:
            el.append(f'<text x="{x0 + 8}" y="{(y0 + y1) / 2}">no finite loss</text>')
            continue
        lo, hi = min(vals), max(vals)
        if hi / lo < 1.5:  # a flat series: give it a decade of room around its middle
            mid = math.sqrt(lo * hi)
            lo, hi = mid / 3.2, mid * 3.2
        llo, lhi = math.log10(lo), math.log10(hi)
        pad = 0.05 * (lhi - llo)
        llo, lhi = llo - pad, lhi + pad

        def sx(b: float, x0: float = x0, x1: float = x1) -> float:
            return x0 + (x1 - x0) * (b + 0.5) / n_blocks

        def sy(v: float, y0: float = y0, y1: float = y1, llo: float = llo,
               lhi: float = lhi) -> float:
            return y1 - (y1 - y0) * (math.log10(v) - llo) / (lhi - llo)

        for t in _log_ticks(10 ** llo, 10 ** lhi):
            y = sy(t)
            el.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e4e4e4"/>')
            el.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">'
                      f"{_fmt_tick(t)}</text>")
        step = _x_step(n_blocks)
        for b in range(0, n_blocks, step):
            x = sx(b)
            el.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 4}" stroke="#999"/>')
            el.append(f'<text x="{x:.1f}" y="{y1 + 15}" text-anchor="middle">{b}</text>')
        el.append(f'<text x="{(x0 + x1) / 2}" y="{y1 + 29}" text-anchor="middle" '
                  'fill="#555">block</text>')
        for series, color, dash in ((r_, _RTN_COLOR, ' stroke-dasharray="5,3"'),
                                    (g, _GPTQ_COLOR, "")):
            if not series:
                continue
            pts = " ".join(f"{sx(b):.1f},{sy(v):.1f}" for b, v in sorted(series.items()))
            el.append(f'<polyline points="{pts}" fill="none" stroke="{color}" '
                      f'stroke-width="1.6"{dash}/>')
            el += [f'<circle cx="{sx(b):.1f}" cy="{sy(v):.1f}" r="2.2" fill="{color}"/>'
                   for b, v in series.items()]
    el.append("</svg>")
    return "\n".join(el) + "\n"


