"""Smoke test: the selection benchmark runs end to end (no timing assertions - see bench/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_selection_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "selection-quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "selection.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [(c["width"], c["lambda_c"]) for c in results["cases"]] == [(16, 1.0), (16, 5.0), (64, 1.0), (64, 5.0)]
    for case in results["cases"]:
        # Our solver and the CBC reference reach the same objective on every frontier.
        assert case["objective_mismatches"] == [] and case["cbc_frontiers"] == 4
        assert {"rebase", "ets", "cbc selection", "program: compact", "program: naive"} <= set(case["wall"])
    assert "| width |" in proc.stdout
