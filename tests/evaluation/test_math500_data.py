"""MATH-500 in bench/data (issue 27): the PRM800K test split, 500 problems, loadable by ``ets eval``."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from ets.evaluation.evaluate import load_dataset

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"


def test_math500_has_the_500_problems_with_their_fields_and_loads() -> None:
    rows = [json.loads(line) for line in (DATA / "math500.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 500 and len({r["id"] for r in rows}) == 500
    assert all(set(r) == {"id", "problem", "answer", "subject", "level"} for r in rows)
    assert Counter(r["level"] for r in rows) == {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}
    assert len({r["subject"] for r in rows}) == 7
    problems = load_dataset(DATA / "math500.jsonl")
    assert [p.id for p in problems] == [r["id"] for r in rows]
    assert problems[0].id == "test/precalculus/807.json" and problems[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert "MIT License" in (DATA / "LICENSE.math500").read_text()


def test_make_math500_keeps_the_fields_and_names_a_missing_one(tmp_path: Path) -> None:
    src = tmp_path / "test.jsonl"
    row = {"id": "test/algebra/1.json", "problem": "p", "answer": "2", "solution": "s \\boxed{2}",
           "subject": "Algebra", "level": 1}
    src.write_text(json.dumps(row) + "\n")
    out = tmp_path / "m.jsonl"
    script = str(DATA / "make_math500.py")
    subprocess.run([sys.executable, script, "--source", str(src), "--out", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text()) == {k: v for k, v in row.items() if k != "solution"}
    del row["level"]
    src.write_text(json.dumps(row) + "\n")
    bad = subprocess.run([sys.executable, script, "--source", str(src), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "'level' missing" in bad.stderr
