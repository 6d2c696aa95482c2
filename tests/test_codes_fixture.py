"""The pipeline's results are pinned: every case of ``codes_fixture.CASES`` gives the codes,
scales, zeros and ``g_idx`` recorded in ``fixtures/codes.json`` (written before the pipeline
became modifiers on a generic sequential pipeline), on tiny random models and stories260K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from codes_fixture import CASES, available, run_case

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "codes.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_codes_equal_the_recorded_ones(case: str) -> None:
    if not available(case):
        pytest.skip("../shared/data is not available")
    got = run_case(case)
    want = FIXTURE[case]
    assert sorted(got) == sorted(want)
    diff = [f"{layer}.{k}" for layer in want for k in want[layer]
            if got[layer][k] != want[layer][k]]
    assert not diff, f"{len(diff)} tensors differ from the fixture, first: {diff[:5]}"
