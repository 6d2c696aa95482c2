"""The README demo's output: the recipe as YAML, a summary instead of the per-layer table, and the
full report written beside the checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from ferroquant import demo
from ferroquant.config import GPTQ
from shared_data import STORIES

needs_data = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data not present")


@pytest.mark.parametrize("recipe", [GPTQ(scheme="W4A16", group_size=64),
                                    GPTQ(scheme="W3A16", group_size=-1, ignore=["re:.*down"])])
def test_recipe_yaml_is_a_recipe_that_reads_back_the_same(recipe):
    text = demo._recipe_yaml(recipe)
    assert "null" not in text and "group_size:" in text
    assert GPTQ.from_dict(yaml.safe_load(text)).resolved_groups() == recipe.resolved_groups()


def test_report_goes_beside_the_checkpoint():
    assert demo.report_dir(Path("a/b/ckpt")) == Path("a/b/ckpt-report")


@needs_data
def test_demo_prints_a_summary_and_writes_the_table(capsys, tmp_path):
    out = tmp_path / "ckpt"
    args = demo.build_parser().parse_args([
        "--model", str(STORIES), "--shipped-text", "--out", str(out), "--num-samples", "2",
        "--seq-len", "64", "--eval-windows", "1", "--max-new-tokens", "2", "--skip-reload",
        "--format", "compressed-tensors", "--group-size", "-1"])  # progress shown, not --quiet
    res = demo.run(args)
    printed = capsys.readouterr().out
    # the recipe as YAML, the summary with the definition of the loss and the worst layers
    assert "recipe (embeddings and the layers under `ignore` stay float):\nscheme: W4A16\n" in printed
    assert "tr((W-Q) H (W-Q)^T)" in printed and "worst 5 layers:" in printed
    assert "round-to-nearest on the same Hessians" in printed
    # not the table: 35 layers of stories260K, of which only the 5 worst are named
    rows = [n for n in (f"model.layers.{b}.{k}" for b in range(5)
                        for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                  "mlp.down_proj")) if n + " " in printed]
    assert len(rows) == 5 and "method/note" not in printed
    # the checkpoint directory holds the checkpoint only; the report is beside it
    assert not any(p.name.startswith("quantization_report") for p in out.iterdir())
    files = res["report_files"]
    assert all(p.parent == tmp_path / "ckpt-report" and p.is_file() for p in files.values())
    with files["csv"].open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 35 and all(float(r["rtn_loss"]) > 0 for r in table)
    assert "method/note" in files["txt"].read_text()
