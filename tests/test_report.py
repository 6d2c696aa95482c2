"""QuantizationReport.summary() and .write(): the short summary, the text/CSV table and the SVG
picture of the per-layer loss by block."""

from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET

import pytest
from ferroquant.report import (
    _GPTQ_COLOR,
    _RTN_COLOR,
    LOSS_DEFINITION,
    LayerReport,
    QuantizationReport,
)

SVG = "{http://www.w3.org/2000/svg}"
KINDS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]


def layer(name: str, block: int, loss: float, rtn: float | None = None, **kw) -> LayerReport:
    kw = {"subset": 0, "out_features": 8, "in_features": 16, "bits": 4, "group_size": -1,
          "symmetric": True, "actorder": None, "method": "gptq", "damp_frac": 0.01,
          "damp_attempts": [0.01], "samples": 64, "seconds": 0.01, **kw}
    return LayerReport(name=name, block=block, loss=loss, rtn_loss=rtn, **kw)


def three_blocks(with_rtn: bool = True) -> QuantizationReport:
    """3 blocks x 3 kinds; loss = (block + 1) * (kind + 1), round-to-nearest twice that."""
    layers = []
    for b in range(3):
        for k, kind in enumerate(KINDS):
            loss = float((b + 1) * (k + 1))
            layers.append(layer(f"model.layers.{b}.{kind}", b, loss,
                                2 * loss if with_rtn else None))
    return QuantizationReport(layers, seconds=1.5, num_samples=4, num_tokens=256)


def test_summary_totals_shares_and_worst_layers():
    rep = three_blocks()
    text = rep.summary(worst=2)
    assert rep.total_loss == 36.0 and rep.total_rtn_loss == 72.0
    assert "9 layers in 3 blocks (9 gptq), 4 samples / 256 tokens" in text
    assert "total loss 36; round-to-nearest on the same Hessians: 72 (2.00x)" in text
    # the definition is there, wrapped
    assert "tr((W-Q) H (W-Q)^T)" in text and "sum over" in text
    assert " ".join(text.split()).count(" ".join(LOSS_DEFINITION.split())) == 1
    # down_proj: (1+2+3)*3 = 18 of 36; q_proj 6 of 36
    assert "mlp.down_proj 50%" in text and "self_attn.q_proj 17%" in text
    worst = text.split("worst 2 layers:\n")[1].splitlines()
    assert worst[0].split()[0] == "model.layers.2.mlp.down_proj"
    assert worst[1].split()[0] == "model.layers.1.mlp.down_proj"
    assert "loss 9 (25.0%), round-to-nearest 18" in worst[0]
    assert len(text.splitlines()) < 15  # a summary, not the table


def test_summary_names_escalated_damping_notes_and_missing_rtn():
    rep = three_blocks(with_rtn=False)
    rep[0].damp_attempts = [0.01, 0.1]
    rep.append(layer("model.layers.2.mlp.extra", 2, float("nan"), method="rtn",
                     note="no calibration token reached it: round-to-nearest"))
    text = rep.summary()
    assert rep.total_rtn_loss is None and "round-to-nearest on the same" not in text
    assert "damping raised on 1 layers: model.layers.0.self_attn.q_proj" in text
    assert "model.layers.2.mlp.extra: no calibration token reached it" in text
    assert "(9 gptq, 1 rtn)" in text
    assert rep.total_loss == 36.0  # the NaN of the unreached layer is not summed


def test_total_rtn_loss_needs_every_solved_layer():
    rep = three_blocks()
    rep[4].rtn_loss = None
    assert rep.total_rtn_loss is None


def test_write_table_csv_and_svg(tmp_path):
    rep = three_blocks()
    rep[3].damp_attempts = [0.01, 0.1]
    paths = rep.write(tmp_path / "new" / "dir")
    assert {p.name for p in paths.values()} == {
        "quantization_report.txt", "quantization_report.csv", "quantization_report.svg"}
    txt = paths["txt"].read_text()
    assert all(r.name in txt for r in rep) and "total loss 36" in txt
    with paths["csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == [r.name for r in rep]
    # floats survive exactly (repr), lists as ';'-joined values
    assert [float(r["loss"]) for r in rows] == [r.loss for r in rep]
    assert [float(r["rtn_loss"]) for r in rows] == [r.rtn_loss for r in rep]
    assert rows[3]["damp_attempts"] == "0.01;0.1"
    assert rows[0]["symmetric"] == "True" and rows[0]["actorder"] == ""
    assert ET.parse(paths["svg"]).getroot().tag == f"{SVG}svg"


def _panels(svg: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Panel title -> {colour: [(x, y) of its points]} from the SVG written by report.svg()."""
    root = ET.fromstring(svg)
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    current = None
    for el in root:
        if el.tag == f"{SVG}text" and el.get("font-weight") == "bold" and el.get("y") != "22":
            current = out.setdefault(el.text or "", {})
        elif el.tag == f"{SVG}circle" and current is not None:
            current.setdefault(el.get("fill") or "", []).append(
                (float(el.get("cx")), float(el.get("cy"))))
    return out


def test_svg_one_panel_per_kind_rtn_above_gptq():
    rep = three_blocks()
    panels = _panels(rep.svg())
    assert [t.split()[0] for t in panels] == KINDS
    assert all("RTN/GPTQ 2.00x" in t for t in panels)
    for title, series in panels.items():
        assert len(series) == 2, title  # GPTQ and round-to-nearest
        gptq, rtn = sorted(series[_GPTQ_COLOR]), sorted(series[_RTN_COLOR])
        assert len(gptq) == len(rtn) == 3
        # same blocks across; loss grows with the block, and round-to-nearest (twice the loss)
        # sits above GPTQ (smaller y) by the same log distance everywhere
        assert [x for x, _ in gptq] == [x for x, _ in rtn]
        assert gptq[0][1] > gptq[1][1] > gptq[2][1]
        gaps = [g[1] - r[1] for g, r in zip(gptq, rtn)]
        assert min(gaps) > 0 and max(gaps) - min(gaps) < 0.2


def test_svg_without_rtn_sums_experts_and_skips_missing_points():
    layers = [layer(f"model.layers.{b}.mlp.experts.{e}.down_proj", b, 1.0 + e)
              for b in range(2) for e in range(4)]
    layers.append(layer("model.layers.2.mlp.experts.0.down_proj", 2, float("nan"),
                        method="rtn"))
    layers.append(layer("model.layers.2.mlp.experts.1.down_proj", 2, 0.0))
    rep = QuantizationReport(layers)
    svg = rep.svg()
    assert "round-to-nearest not computed" in svg and "nan" not in svg.lower()
    panels = _panels(svg)
    (title, series), = panels.items()
    assert title.startswith("mlp.experts.*.down_proj (sum of 4 per block)")
    (points,) = series.values()
    assert len(points) == 2  # block 2 has no finite positive sum
    assert points[0][1] == pytest.approx(points[1][1])  # both blocks sum to 10


def test_svg_of_an_empty_report_is_valid():
    svg = QuantizationReport().svg()
    assert ET.fromstring(svg).tag == f"{SVG}svg" and "no layer inside a decoder block" in svg
    assert math.isclose(QuantizationReport().total_loss, 0.0)
