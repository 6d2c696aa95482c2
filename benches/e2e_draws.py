"""How the SmolLM2 comparisons move with the calibration draw (W4 g64 or W3 g64).

GPTQ perplexities move by about 1% with which 64 C4 windows calibrate, about as much as the
methods differ, so one draw cannot rank them. This script runs ``bench_e2e.py`` once per draw
(seed 0: the first tokens in order, the main table's setting; seed N > 0: random windows drawn
with seed N), keeps every raw row in ``benches/results/e2e-smollm2-draws.json`` and writes
``e2e-smollm2-draws.md``: perplexity per draw, the mean, and ferroquant minus llm-compressor
per draw (paired: both saw the same tokens).

    python benches/e2e_draws.py run 5 6 7      # adds draws 5-7 (about 10 minutes each)
    python benches/e2e_draws.py summary        # rewrites the markdown from the JSON
    python benches/e2e_draws.py --scheme "W3 g64" run 1 2 --methods ferroquant \
        ferroquant-qronos llmcompressor        # any of bench_e2e.py's methods

W3 g64 keeps its rows in ``e2e-smollm2-w3g64-draws.{json,md}``.

Only perplexity is compared across draws; speed is the main table's business (these runs often
share the machine with other work, which each row's load average records).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benches" / "results"
SCHEMES = {"W4 g64": "e2e-smollm2-draws", "W3 g64": "e2e-smollm2-w3g64-draws"}
sys.path.insert(0, str(REPO / "benches"))
from bench_e2e import METHODS as ALL_METHODS
from bench_e2e import write_json

METHODS = [m for m in ALL_METHODS if m not in ("float", "rtn")]
DEFAULT_METHODS = ["ferroquant", "ferroquant-bf16", "llmcompressor"]
LABELS = {"ferroquant": "ferroquant",
          "ferroquant-bf16": 'ferroquant, forward_dtype="bfloat16"',
          "llmcompressor": "llm-compressor"}
BASELINE = "llmcompressor"
SCHEME = "W4 g64"  # set by --scheme


def raw_path() -> Path:
    return RESULTS / f"{SCHEMES[SCHEME]}.json"


def load_raw() -> dict[str, Any]:
    return json.loads(raw_path().read_text()) if raw_path().is_file() else {"draws": {}}


def run(seeds: list[int], methods: list[str]) -> None:
    raw = load_raw()
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "draw.md"
            cmd = [sys.executable, str(REPO / "benches" / "bench_e2e.py"), "--model", "smollm2",
                   "--schemes", SCHEME, "--methods", *methods, "--calib-seed", str(seed),
                   "--out", str(out)]
            print(f"e2e_draws: draw {seed}: {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.call(cmd)
            got = json.loads(out.with_suffix(".json").read_text())
        rows = raw["draws"].setdefault(str(seed), {})
        for method, row in got["runs"].get(SCHEME, {}).items():
            if "error" not in row:
                rows[method] = row
        raw["cfg"] = {k: v for k, v in got["cfg"].items() if k != "calib_seed"}
        write_json(raw_path(), raw)  # after every draw: a run may be cut
        if rc:
            print(f"e2e_draws: draw {seed} had failed rows (exit {rc}); kept the others")
    summary()


# two-sided 5% critical values of Student's t by degrees of freedom (standard tables)
T_CRIT_5 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
            10: 2.23, 11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 19: 2.09, 24: 2.06}


def _sign_test(wins: int, n: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if both methods
    were equally likely to win each draw."""
    k = max(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return m, sd


def summary() -> str:
    raw = load_raw()
    draws = sorted(raw["draws"], key=int)
    cfg = raw.get("cfg", {})
    lines = [
        f"# End-to-end GPTQ on SmolLM2: {SCHEME} over calibration draws", "",
        (f"- calibration: {cfg.get('num_samples')} x {cfg.get('seq_len')}-token C4 windows; "
        "draw 0 = the first tokens in order (the main table, `e2e-smollm2.md`), draw N > 0 = "
        "random windows drawn with seed N"),
        (f"- evaluation: WikiText-2 test, {cfg.get('eval_seq_len')}-token windows, first "
        f"{cfg.get('max_windows')}"),
        (f"- every GPTQ run: symmetric int{SCHEME[1]}, group 64, minmax scales, actorder static, "
         "dampening 0.01, block 128 unless the method's name says otherwise (see "
         "`e2e-smollm2.md`); every method is deterministic for a given draw"),
        f"- written by `benches/e2e_draws.py` from `{raw_path().name}`",
        *[f"- note: {n}" for n in raw.get("notes", [])], "",
        "| method | draw " + " | ".join(draws) + " | mean | sd |",
        "|---|" + "---:|" * (len(draws) + 2),
    ]
    ppl: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for d in draws:
        for m, row in raw["draws"][d].items():
            if m in ppl:
                ppl[m][d] = row["ppl"]
    shown = [m for m in METHODS if ppl[m]]
    for m in shown:
        vals = [ppl[m].get(d) for d in draws]
        got = [v for v in vals if v is not None]
        mean, sd = _mean_sd(got) if got else (math.nan, math.nan)
        cells = " | ".join("" if v is None else f"{v:.2f}" for v in vals)
        lines.append(f"| {LABELS.get(m, m)} | {cells} | {mean:.2f} | {sd:.2f} |")
    lines += ["", (f"Paired against {LABELS[BASELINE]} (same draws; negative = lower perplexity "
              "than llm-compressor):"), "",
              ("| method | draws | better on | sign test p | mean difference | sd | t | "
              "t at 5% |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in shown:
        if m == BASELINE:
            continue
        both = [d for d in draws if d in ppl[m] and d in ppl[BASELINE]]
        if not both:
            continue
        diff = [ppl[m][d] - ppl[BASELINE][d] for d in both]
        mean, sd = _mean_sd(diff)
        t = mean / (sd / math.sqrt(len(diff))) if len(diff) > 1 and sd > 0 else math.nan
        better = sum(x < 0 for x in diff)
        base = _mean_sd([ppl[BASELINE][d] for d in both])[0]
        crit = T_CRIT_5.get(len(both) - 1)
        lines.append(f"| {LABELS.get(m, m)} | {len(both)} | {better} of {len(both)} | "
                     f"{_sign_test(better, len(both)):.3f} | {mean:+.3f} "
                     f"({100 * mean / base:+.2f}%) | {sd:.3f} | {t:.2f} | "
                     f"{'' if crit is None else f'{crit:.2f}'} |")
    lines += ["", ("t: the paired t statistic (mean difference over its standard error); the "
              "difference is significant at the 5% level (two-sided) when |t| exceeds the last "
              "column, Student's t for n - 1 degrees of freedom. The sign test asks only how "
              "often each method won.")]
    md = "\n".join(lines) + "\n"
    raw_path().with_suffix(".md").write_text(md)
    print(md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", choices=list(SCHEMES), default="W4 g64")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run these draws (seeds) and update the results")
    r.add_argument("seeds", nargs="+", type=int)
    r.add_argument("--methods", nargs="*", choices=METHODS, default=DEFAULT_METHODS)
    sub.add_parser("summary", help="rewrite the markdown from the JSON")
    args = p.parse_args(argv)
    global SCHEME
    SCHEME = args.scheme
    if args.cmd == "run":
        run(args.seeds, args.methods)
    else:
        summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
