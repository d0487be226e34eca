"""``ets eval --preset`` (issue 27), pure parts: the versioned preset file, how it fills the command
line, the plan printed before a run, strict and flexible extraction in the report, and the
throughput phase's closed loop and summary."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from ets.search.config import SearchConfig
from ets.errors import ConfigError
from ets.evaluation import evaluate as ev
from ets.evaluation import report as rep
from ets.evaluation import throughput as tp
from ets.evaluation.preset import load_preset
from ets.search import answers

REFERENCE = {  # SqueezeAILab/ETS hype-parameters/ets_{16,64,256}_math500.yaml
    "temperature": 1.0, "max_step_tokens": 256, "max_tokens": 1024, "softmax_temperature": 0.2, "lambda_c": 1.0,
    "prm_type": "llemma", "policy_model_type": "math-shepherd", "voting": "weighted_majority",
}


def test_the_math500_preset_holds_the_reference_settings() -> None:
    p = load_preset("math500-reference")
    assert (p.name, p.version, p.dataset) == ("math500-reference", 1, "bench/data/math500.jsonl")
    assert p.methods == ("rebase", "ets", "best_of_n") and p.widths == (16, 64, 256)
    assert {k: p.config[k] for k in REFERENCE} == REFERENCE
    assert p.lambda_s == {16: 1.5, 64: 1.4, 256: 1.45}
    # The config's width presets are the same values: every ETS run is plain "ets" (one label).
    assert all(p.lambda_s_overrides(w) == () for w in p.widths)
    assert SearchConfig(**p.config, width=64).resolved().lambda_s == 1.4
    assert p.throughput is not None and p.throughput.methods == ("rebase", "ets")  # ratios: ETS over REBASE
    assert (Path(__file__).resolve().parents[2] / p.dataset).is_file()


@pytest.mark.parametrize("text,field", [
    ('name = "x"\nversion = 1\ndataset = "d"\nmethods = ["ets"]\nwidths = [4]\n[config]\nwidth = 8\n',
     "preset.config.width"),
    ('name = "x"\nversion = 1\ndataset = "d"\nmethods = ["ets"]\nwidths = [4]\n[config]\ntemperature = -1\n',
     "preset.config.temperature"),
    ('name = "x"\nversion = 1\ndataset = "d"\nmethods = ["ets"]\nwidths = []\n[config]\n', "preset.widths"),
    ('name = "x"\nversion = 1\ndataset = "d"\nmethods = ["ets"]\nwidths = [4]\ncolour = 1\n[config]\n',
     "preset.colour"),
    ('name = "x"\nversion = 1\nmethods = ["ets"]\nwidths = [4]\n[config]\n', "preset.dataset"),
    ('name = "x"\nversion = 1\ndataset = "d"\nmethods = ["ets"]\nwidths = [4]\n[config]\n[lambda_s]\nw = 1\n',
     "preset.lambda_s"),
])
def test_a_bad_preset_names_its_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_preset(str(path))
    assert err.value.field == field
    with pytest.raises(ConfigError, match="available: math500-reference"):
        load_preset("no-such-preset")


def test_a_preset_lambda_s_unlike_the_width_preset_becomes_the_ets_override(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\nversion = 2\ndataset = "d"\nmethods = ["ets"]\nwidths = [16]\n[config]\n'
                    '[lambda_s]\n16 = 1.2\n')
    assert load_preset(str(path)).lambda_s_overrides(16) == (("lambda_s", 1.2),)


def _args(*argv: str) -> argparse.Namespace:
    return ev.build_parser().parse_args(list(argv))


def test_the_preset_fills_what_the_command_line_left_unset(tmp_path: Path) -> None:
    args = _args("--preset", "math500-reference", "--out-dir", str(tmp_path), "--widths", "4",
                 "--policy-model-type", "smollm2-instruct", "--max-tokens", "192")
    preset = ev.apply_preset(args)
    assert args.dataset == "bench/data/math500.jsonl" and args.methods == "rebase,ets,best_of_n"
    assert args.widths == "4"  # given: kept
    assert args.cfg_policy_model_type == "smollm2-instruct" and args.cfg_max_tokens == 192  # given: kept
    assert args.cfg_prm_type == "llemma" and args.cfg_max_step_tokens == 256 and args.cfg_seed == 0  # the preset's
    assert args.store == str(tmp_path / "store.jsonl") and args.out == str(tmp_path / "report.json")
    assert args.jsonl == str(tmp_path / "searches.jsonl") and args.markdown == str(tmp_path / "report.md")
    assert args.resume and args.concurrency == preset.concurrency


def test_the_plan_counts_searches_and_bounds_the_sampled_tokens() -> None:
    problems = [ev.Problem(str(i), "p", "1") for i in range(500)]
    runs = ev.plan_runs(["rebase", "ets", "best_of_n"], [16, 64, 256])
    text = ev.plan_text(problems, runs, 9, SearchConfig(max_tokens=1024), 4)
    assert "500 problems x 9 configurations = 4500 searches (9 already done, 4491 to run, 4 at a time)" in text
    assert "width 256: rebase, ets, best_of_n; at most 262,144 sampled tokens per search" in text
    assert f"at most {500 * 3 * (16 + 64 + 256) * 1024:,} in all" in text
    assert "about 2.0 h (7200 s)" in ev.estimate_text(100.0, 10, 730)


@pytest.mark.parametrize("text,number", [
    ("so 3 + 5 = 8 apples", "8"),
    ("It costs $1,250.", "1250"),
    ("The answer is 3 apples, and the solution is 5", "5"),
    ("no numbers here", ""),
    ("-4 degrees", "-4"),
    ("1.5 hours.", "1.5"),
])
def test_flexible_extraction_takes_the_last_number(text: str, number: str) -> None:
    assert answers.extract_final_number(text) == number


def test_grade_votes_the_flexible_extraction_on_numeric_references() -> None:
    stats = argparse.Namespace(**{name: 0 for name in rep.STAT_FIELDS})
    cands = [("He has 3 + 5 = 8 apples", 0.9), ("The answer is 7.", 0.2), ("so 8 apples", 0.5)]
    r = rep.grade(rep.ProblemResult("a", "ets", "ets", 4, "8"), "7", ["", "7", ""], stats, cands)
    assert r.numeric and not r.correct and r.flexible_answer == "8" and r.flexible_correct
    m = rep.grade(rep.ProblemResult("b", "ets", "ets", 4, r"\frac{1}{2}"), "", [""], stats, cands)
    assert not m.numeric and m.flexible_answer == ""  # MATH-style answers: strict only
    rows = rep.extraction_rows([r, m])
    assert rows == [{"label": "ets", "width": 4, "problems": 1, "strict_correct": 0,
                     "strict_ci": list(rep.wilson_interval(0, 1)), "flexible_correct": 1,
                     "flexible_ci": list(rep.wilson_interval(1, 1)), "strict_answered": 1, "flexible_answered": 1,
                     "only_strict": 0, "only_flexible": 1}]
    assert "| ets | 4 | 1 | 0/1 0.0% (0-79%) | 1/1 100.0% (21-100%) | 1 / 1 | 0 / 1 |" in rep.extraction_markdown(rows)


def test_the_throughput_loop_alternates_methods_resumes_and_summarises() -> None:
    calls: list[tuple[int, str, int]] = []

    async def one(index: int, method: str, width: int) -> rep.ProblemResult:
        calls.append((index, method, width))
        await asyncio.sleep(0.01 if method == "ets" else 0.02)
        return rep.ProblemResult(str(index), method, method, width, "1", total_kv_tokens=10, generated_tokens=5)

    levels = asyncio.run(tp.measure(one, 3, ["ets", "rebase"], [4], concurrency=2, searches=4, rounds=2))
    assert [(lv.method, lv.round) for lv in levels] == [("ets", 0), ("rebase", 0), ("ets", 1), ("rebase", 1)]
    assert sorted(i for i, m, _ in calls[:4]) == [0, 0, 1, 2] and all(lv.searches == 4 for lv in levels)
    rows = [tp.as_row(lv) for lv in levels]
    again = asyncio.run(tp.measure(one, 3, ["ets", "rebase"], [4], concurrency=2, searches=4, rounds=2, done=rows))
    assert again == []  # resumed: nothing run twice
    summary = tp.summarise(rows)
    assert [(s["method"], s["searches"]) for s in summary] == [("ets", 8), ("rebase", 8)]
    assert summary[0]["ratio_to_first"] == 1.0 and 0 < summary[1]["ratio_to_first"] < 1  # rebase slower here
    assert "| 4 | rebase | 2 | 8 (0) |" in tp.markdown(summary)
