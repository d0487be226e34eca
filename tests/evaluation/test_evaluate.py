"""``ets eval``'s pure parts: datasets (the committed ones and their generators), the Wilson
interval, run planning and sweeps, summaries, the ETS-vs-REBASE comparison, resumable output and
the plot. The real run over the stack is in test_stack_search.py."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from ets.evaluation import report as rep
from ets.evaluation import evaluate as ev

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "bench" / "data"


# ---- datasets ---------------------------------------------------------------------------------


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_dataset_reads_fields_and_reduces_gsm8k_answers(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [
        {"id": "a", "problem": "1+1?", "answer": "2"},
        "",
        {"question": "Worked?", "answer": "3 + 4 = 7\n#### 7"},
        {"unique_id": "u", "problem": "x", "answer": 5},
    ])
    problems = ev.load_dataset(path)
    assert [(p.id, p.problem, p.answer) for p in problems] == [("a", "1+1?", "2"), ("3", "Worked?", "7"),
                                                               ("u", "x", "5")]
    assert [p.id for p in ev.load_dataset(path, limit=2)] == ["a", "3"]


@pytest.mark.parametrize("row, message", [
    ("{not json", "1: not JSON"),
    ("[1, 2]", "1: not a JSON object"),
    ({"answer": "2"}, "field 'problem' (or 'question') missing"),
    ({"problem": "  ", "answer": "2"}, "field 'problem' (or 'question') missing or empty"),
    ({"problem": "p"}, "field 'answer' missing"),
    ({"problem": "p", "answer": " "}, "field 'answer' missing or empty"),
])
def test_load_dataset_names_the_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ev.DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ev.load_dataset(path)


def test_load_dataset_rejects_repeated_ids_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ev.DatasetError, match="2: field 'id' repeats 'a'"):
        ev.load_dataset(write(tmp_path / "dup.jsonl", [{"id": "a", "problem": "p", "answer": 1}] * 2))
    with pytest.raises(ev.DatasetError, match="no problems"):
        ev.load_dataset(write(tmp_path / "empty.jsonl", [""]))


def test_committed_gsm8k_subset_is_the_easiest_and_licensed() -> None:
    problems = ev.load_dataset(DATA / "gsm8k_easy.jsonl")
    assert len(problems) == 100 and len({p.id for p in problems}) == 100
    rows = [json.loads(line) for line in (DATA / "gsm8k_easy.jsonl").read_text().splitlines()]
    assert all(r["id"].startswith("gsm8k-test-") and r["steps"] == 2 for r in rows)
    # Answers are GSM8K's final numbers, which its worked solutions reach.
    assert all(r["answer"] in r["solution"].replace(",", "") for r in rows)
    assert [p.answer for p in problems] == [r["answer"] for r in rows]
    assert "MIT License" in (DATA / "LICENSE.gsm8k").read_text()


def test_gsm8k_selector_ranks_by_steps_then_length(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_gsm8k_easy", DATA / "make_gsm8k_easy.py")
    assert spec is not None and spec.loader is not None
    sel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sel)
    rows = [
        {"id": "three", "problem": "short", "answer": "1", "solution": "a=<<1=1>>1\nb=<<2=2>>2\nc=<<3=3>>3"},
        {"id": "two-long", "problem": "a longer problem", "answer": "2", "solution": "a=<<1=1>>1\nb=<<2=2>>2"},
        {"id": "two-lines-one-note", "problem": "mid", "answer": "3", "solution": "a=<<1=1>>1\nso 3"},
        {"id": "two-short", "problem": "ab", "answer": "4", "solution": "x\ny"},
    ]
    assert [sel.solution_steps(r["solution"]) for r in rows] == [3, 2, 2, 2]
    picked = sel.easiest(rows, 3)
    assert [r["id"] for r in picked] == ["two-short", "two-lines-one-note", "two-long"]
    assert all(r["steps"] == 2 for r in picked)


def test_arith_generator_is_deterministic_and_its_answers_are_right(tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (out1, out2):
        done = subprocess.run([sys.executable, str(DATA / "make_arith.py"), "--seed", "0", "--count", "100",
                               "--out", str(out)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert out1.read_bytes() == out2.read_bytes()
    # The committed file is this seed's output.
    assert out1.read_bytes() == (DATA / "arith_easy.jsonl").read_bytes()
    rows = [json.loads(line) for line in out1.read_text().splitlines()]
    assert {r["steps"] for r in rows} == {1, 2} and sum(r["steps"] == 1 for r in rows) == 50
    for r in rows:
        # Each solution line is "a op b = c" and holds; the last result is the answer.
        for line in r["solution"].splitlines():
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), (r["id"], line)  # our own generated arithmetic
        assert r["solution"].splitlines()[-1].split("=")[1].strip() == r["answer"]
        assert r["answer"] not in ("", "0") and int(r["answer"]) > 0
        assert len(r["solution"].splitlines()) == r["steps"]
    other = tmp_path / "c.jsonl"
    subprocess.run([sys.executable, str(DATA / "make_arith.py"), "--seed", "1", "--count", "100", "--out",
                    str(other)], check=True, capture_output=True, timeout=60)
    assert other.read_bytes() != out1.read_bytes()


# ---- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.2775),    # an all-wrong sample still leaves room above 0
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (81, 100, 0.7222, 0.8749),
    (1, 20, 0.0089, 0.2361),
])
def test_wilson_interval_matches_reference_values(k: int, n: int, lo: float, hi: float) -> None:
    got = rep.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert got[0] <= k / n <= got[1]


def test_wilson_interval_edges() -> None:
    assert rep.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        rep.wilson_interval(3, 2)
    # Narrows with more trials at the same proportion.
    a, b = rep.wilson_interval(5, 10), rep.wilson_interval(50, 100)
    assert b[1] - b[0] < a[1] - a[0]


# ---- runs and sweeps -------------------------------------------------------------------------


def test_parse_sweep_and_plan_runs() -> None:
    grid = ev.parse_sweep(["cluster_distance=0.1, 0.3", "lambda_c=1,2", "node_cost=uniform,tokens"])
    assert grid == {"cluster_distance": [0.1, 0.3], "lambda_c": [1.0, 2.0], "node_cost": ["uniform", "tokens"]}
    runs = ev.plan_runs(["ets", "rebase"], [8, 16], {"cluster_distance": [0.1, 0.3], "lambda_c": [1.0]}, [16])
    labels = [(r.label, r.width) for r in runs]
    assert labels == [("ets", 8), ("rebase", 8), ("ets", 16), ("rebase", 16),
                      ("ets[cluster_distance=0.1,lambda_c=1]", 16), ("ets[cluster_distance=0.3,lambda_c=1]", 16)]
    # The sweep defaults to every width; duplicates are dropped.
    assert len(ev.plan_runs(["ets", "ets"], [4], {"lambda_s": [0.0]})) == 2


def test_sweeps_per_method_early_stop_and_widths_per_method() -> None:
    grid = ev.parse_sweep(["lambda_c=1,5", "early_stop=off,on", "rebase:early_stop=0,1"])
    assert grid == {"lambda_c": [1.0, 5.0], "early_stop": [False, True], "rebase:early_stop": [False, True]}
    methods = ev.parse_methods("ets,rebase,beam@16")
    assert methods == [("ets", None), ("rebase", None), ("beam", 16)]
    # Overrides equal to the base configuration are dropped: lambda_c=1 / early_stop=False is plain
    # "ets", so the grid adds three ETS rows and one REBASE row per width, not duplicates.
    runs = ev.plan_runs(methods, [8, 16], grid, [16], defaults={"lambda_c": 1.0, "early_stop": False})
    assert [(r.label, r.width) for r in runs] == [
        ("ets", 8), ("rebase", 8), ("ets", 16), ("rebase", 16), ("beam", 16),
        ("ets[lambda_c=5]", 16), ("ets[early_stop=True]", 16), ("ets[early_stop=True,lambda_c=5]", 16),
        ("rebase[early_stop=True]", 16)]
    # A METHOD@W outside --widths still runs at W.
    assert [(r.label, r.width) for r in ev.plan_runs([("best_of_n", 32)], [8])] == [("best_of_n", 32)]
    with pytest.raises(ValueError, match="width 'x' is not an integer"):
        ev.parse_methods("beam@x")


@pytest.mark.parametrize("item, message", [
    ("lambda_c", r"expected \[METHOD:\]FIELD=v1,v2"),
    (":lambda_c=1", "empty method"),
    ("early_stop=1,maybe", "early_stop value 'maybe' is not a boolean"),
    ("width=4,8", "field 'width' is not sweepable"),
    ("lambda_c=1,x", "lambda_c value 'x' is not a number"),
])
def test_parse_sweep_names_the_bad_item(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ev.parse_sweep([item])
    with pytest.raises(ValueError, match="given twice"):
        ev.parse_sweep(["lambda_c=1", "lambda_c=2"])


def test_config_for_applies_method_width_seed_and_overrides() -> None:
    from ets.api.v1 import search_pb2

    base = search_pb2.SearchConfig(max_tokens=300, lambda_c=1.0)
    spec = ev.RunSpec("ets", 16, (("cluster_distance", 0.3), ("lambda_c", 2.0)))
    config = ev._config_for(spec, base, 7)
    assert (config.method, config.width, config.seed, config.max_tokens) == ("ets", 16, 7, 300)
    assert config.cluster_distance == pytest.approx(0.3) and config.lambda_c == 2.0
    assert base.lambda_c == 1.0 and not base.HasField("width")  # the base is not modified


# ---- summaries --------------------------------------------------------------------------------


def result(label: str, width: int, pid: str, correct: bool, kv: int, **kw: object) -> rep.ProblemResult:
    method = label.split("[")[0]
    values: dict[str, object] = dict(total_kv_tokens=kv, peak_kv_tokens=kv // 4, generated_tokens=100,
                                     prompt_tokens=200, cached_prompt_tokens=150, wall_seconds=2.0, frontier=10,
                                     kept=4, answer="8" if correct else "", oracle=correct)
    values.update(kw)
    return rep.ProblemResult(id=pid, label=label, method=method, width=width, reference="8", correct=correct,
                            **values)  # type: ignore[arg-type]


def test_summarise_counts_accuracy_interval_kv_and_reuse() -> None:
    rs = [result("rebase", 8, str(i), i < 6, 1000 + 100 * i) for i in range(10)]
    rs.append(result("rebase", 8, "x", False, 0, error="DEADLINE_EXCEEDED: late", answer=""))
    rs.append(result("ets", 8, "0", True, 400, answer="8", oracle=True))
    rs.append(result("ets", 8, "1", False, 600, answer="7", oracle=True))
    (ets, rebase) = rep.summarise(rs)
    assert (rebase.label, rebase.problems, rebase.errors, rebase.correct) == ("rebase", 11, 1, 6)
    assert rebase.accuracy == pytest.approx(6 / 11)
    assert (rebase.accuracy_ci_low, rebase.accuracy_ci_high) == pytest.approx(rep.wilson_interval(6, 11))
    # KV, tokens and reuse average the finished searches only.
    assert rebase.mean_total_kv_tokens == pytest.approx(1450.0)
    assert rebase.max_peak_kv_tokens == 1900 // 4
    assert rebase.cache_reuse == pytest.approx(0.75) and rebase.kept_share == pytest.approx(0.4)
    assert rebase.generated_tokens_per_second == pytest.approx(50.0)
    assert rebase.answered == pytest.approx(6 / 11) and rebase.oracle_accuracy == pytest.approx(6 / 11)
    assert (ets.answered, ets.oracle_accuracy, ets.accuracy) == (1.0, 1.0, 0.5)


def test_compare_to_rebase_pairs_problems_and_judges_the_goal() -> None:
    rs = [result("rebase", 16, str(i), i < 5, 2000) for i in range(10)]
    rs += [result("ets", 16, str(i), i < 4, 1000) for i in range(10)]                      # 2x less, -10 points
    rs += [result("ets[lambda_c=2]", 16, str(i), i < 1, 500) for i in range(10)]           # 4x less, -40 points
    rs += [result("ets[lambda_c=0.5]", 16, str(i), i < 5, 1500) for i in range(10)]        # 1.33x less, same
    rs.append(result("ets", 16, "extra", True, 10))  # unpaired: not in the KV ratio
    by = {c["label"]: c for c in rep.compare_to_rebase(rep.summarise(rs), rs)}
    assert by["ets"]["kv_reduction_total"] == pytest.approx(2.0)
    assert by["ets"]["accuracy_within_rebase_ci"] and by["ets"]["goal_met"]
    assert by["ets[lambda_c=2]"]["kv_reduction_total"] == pytest.approx(4.0)
    assert not by["ets[lambda_c=2]"]["accuracy_within_rebase_ci"] and not by["ets[lambda_c=2]"]["goal_met"]
    assert by["ets[lambda_c=0.5]"]["accuracy_within_rebase_ci"] and not by["ets[lambda_c=0.5]"]["goal_met"]
    assert by["ets[lambda_c=0.5]"]["kv_reduction_peak"] == pytest.approx(2000 / 1500, rel=1e-3)
    # No REBASE at a width: nothing to compare.
    assert rep.compare_to_rebase(rep.summarise([result("ets", 8, "0", True, 5)])) == []


def test_zero_against_zero_is_not_within_rebases_interval() -> None:
    rs = [result("rebase", 16, str(i), False, 2000) for i in range(5)]
    rs += [result("ets", 16, str(i), False, 500) for i in range(5)]
    summaries = rep.summarise(rs)
    (c,) = rep.compare_to_rebase(summaries, rs)
    assert c["kv_reduction_total"] == pytest.approx(4.0)
    assert not c["accuracy_measured"] and not c["accuracy_within_rebase_ci"] and not c["goal_met"]
    assert "(not measured: neither right on any problem): goal not met" in rep.markdown_table(summaries, [c])


def test_tables_show_every_configuration() -> None:
    rs = [result("rebase", 8, "0", True, 1000), result("ets[cluster_distance=0.3]", 8, "0", True, 400)]
    summaries = rep.summarise(rs)
    md = rep.markdown_table(summaries, rep.compare_to_rebase(summaries, rs))
    assert md.count("\n| ") == 2  # one row per configuration
    assert "| ets[cluster_distance=0.3] | 8 | 1 | 100.0% (21-100%) |" in md
    assert "REBASE/ETS KV total 2.50x" in md and "goal met" in md
    text = rep.format_table(summaries)
    assert "rebase" in text and "21-100%" in text


def test_read_jsonl_round_trips_and_skips_a_cut_off_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = [result("ets", 4, "a", True, 10), result("rebase", 4, "a", False, 20, error="UNAVAILABLE: x")]
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows) + '{"id": "b", "lab')
    back = rep.read_jsonl(path)
    assert back == rows and back[0].key == ("ets", 4, "a")
    assert rep.read_jsonl(tmp_path / "missing.jsonl") == []


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rs = [result(m, w, str(i), i % 2 == 0, 1000 * w) for m in ("ets", "rebase") for w in (4, 8) for i in range(4)]
    rs += [result("ets[lambda_c=2]", 8, str(i), True, 3000) for i in range(4)]
    out = tmp_path / "p.png"
    rep.plot(rep.summarise(rs), out, title="t")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000


def test_cli_rejects_bad_usage(tmp_path: Path) -> None:
    data = write(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"}])
    for args, message in [
        (["--widths", "a"], "--widths and --sweep-widths must be comma-separated integers"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
        (["--sweep", "width=4"], "field 'width' is not sweepable"),
    ]:
        done = subprocess.run([sys.executable, "-m", "ets.cli", "eval", str(data), *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "ets.cli", "eval", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "none.jsonl" in done.stderr


def test_report_only_merges_per_search_files(tmp_path: Path) -> None:
    data = write(tmp_path / "d.jsonl", [{"id": "a", "problem": "p", "answer": "8"}])
    first, second = tmp_path / "w4.jsonl", tmp_path / "w16.jsonl"
    first.write_text(json.dumps(asdict(result("rebase", 4, "a", True, 100))) + "\n")
    second.write_text(json.dumps(asdict(result("rebase", 16, "a", True, 400))) + "\n"
                      + json.dumps(asdict(result("ets", 16, "a", True, 200))) + "\n")
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    done = subprocess.run([sys.executable, "-m", "ets.cli", "eval", str(data), "--report-only", str(first),
                           "--report-only", str(second), "--out", str(out), "--markdown", str(md), "--plot", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert {(s["label"], s["width"]) for s in report["summary"]} == {("rebase", 4), ("rebase", 16), ("ets", 16)}
    assert report["ets_vs_rebase"][0]["kv_reduction_total"] == pytest.approx(2.0)
    assert "| ets | 16 | 1 |" in md.read_text() and png.stat().st_size > 0
    missing = subprocess.run([sys.executable, "-m", "ets.cli", "eval", str(data), "--report-only",
                              str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.jsonl: no such file" in missing.stderr


def test_report_only_keeps_the_problems_of_the_data_set_and_limit(tmp_path: Path) -> None:
    """A cut-off run's last problem has only some configurations: ``--limit`` leaves it out."""
    data = write(tmp_path / "d.jsonl", [{"id": "a", "problem": "p", "answer": "8"},
                                        {"id": "b", "problem": "q", "answer": "9"}])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(asdict(r)) + "\n" for r in (
        result("rebase", 8, "a", True, 400), result("ets", 8, "a", True, 200), result("rebase", 8, "b", False, 900))))
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "ets.cli", "eval", str(data), "--limit", "1", "--report-only",
                           str(rows), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 of 3 results are of problems outside" in done.stderr and "--limit 1" in done.stderr
    report = json.loads(out.read_text())
    assert report["problems"] == 1
    assert {(s["label"], s["problems"]) for s in report["summary"]} == {("rebase", 1), ("ets", 1)}


def test_request_ids_use_only_characters_the_service_accepts() -> None:
    spec = ev.RunSpec("ets", 8, (("cluster_distance", 0.3), ("lambda_c", 2.0)))
    rid = ev.request_id(spec, ev.Problem("gsm8k test/7", "p", "1"))
    assert rid == "eval-ets_cluster_distance_0.3_lambda_c_2_-w8-gsm8k_test_7"
