"""bench/cluster_calibration.py's pure parts: the number proxy of "same step", pair agreement,
the per-cut analysis and its best-agreement cut, with the real MiniLM embedder on fixed steps.
(The sampling half needs a policy server with a real model: it runs in the evaluation itself.)"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cluster_calibration as cal

sys.path.pop(0)


def test_numbers_are_a_sorted_multiset_without_separators() -> None:
    assert cal.numbers("She pays 3 * $1,200 = $3,600, then 3.5 more and 3") == ("1200", "3", "3", "3.5", "3600")
    assert cal.numbers("First, find the total.") == ()


def test_pair_agreement_counts_pairs_and_skips_numberless_pairs() -> None:
    keys = [("2", "3"), ("2", "3"), ("5",), (), ()]
    # Clusters: {0, 1, 2}, {3, 4}: pair (0,1) true positive, (0,2) and (1,2) false positives,
    # (3,4) skipped (no numbers on either side), cross pairs true negatives.
    got = cal.pair_agreement([0, 0, 0, 1, 1], keys)
    assert (got["tp"], got["fp"], got["fn"]) == (1, 2, 0)
    assert got["precision"] == pytest.approx(1 / 3) and got["recall"] == 1.0 and got["f1"] == pytest.approx(0.5)
    apart = cal.pair_agreement([0, 1, 2, 3, 4], keys)
    assert (apart["tp"], apart["fp"], apart["fn"]) == (0, 0, 1) and apart["f1"] == 0.0


def test_analyse_finds_the_cut_that_groups_equal_steps() -> None:
    steps = ["2 + 3 = 5", "2 + 3 is 5", "7 * 4 = 28", "Add 2 and 3 to get 5"]
    keys = [list(cal.numbers(s)) for s in steps]
    problem = {"steps": steps, "numbers": keys, "labels": {
        "0.05": [0, 1, 2, 3],      # nothing merges
        "0.2": [0, 0, 1, 0],       # the three "2 + 3 = 5" steps merge, 7 * 4 stays apart
        "0.5": [0, 0, 0, 0],       # everything merges
    }}
    result = cal.analyse([problem], [0.05, 0.2, 0.5])
    by = {c["cut"]: c for c in result["per_cut"]}
    assert [by[c]["mean_clusters"] for c in (0.05, 0.2, 0.5)] == [4, 2, 1]
    assert by[0.2]["pair_f1"] == 1.0 and by[0.05]["pair_recall"] == 0.0 and by[0.5]["pair_precision"] == 0.5
    assert result["best_agreement_cut"] == 0.2 and result["best_agreement_f1"] == 1.0


def test_real_embedder_separates_different_arithmetic() -> None:
    """MiniLM through the reward server's Embedder and the search's clustering: paraphrases of one
    step are closer than steps with other numbers, so some cut splits them apart."""
    from ets.reward.embedder import Embedder

    embedder = Embedder()
    embedder.load()
    steps = ["Tom has 3 apples and buys 5 more, so he has 3 + 5 = 8 apples.",
             "Tom has 3 apples and buys 5 more, so now he has 3 + 5 = 8 apples.",
             "A box holds 12 pencils, so 4 boxes hold 12 * 4 = 48 pencils."]
    emb = asyncio.run(cal._embed_all(embedder, [steps]))[0]
    labels = cal.cluster_counts(emb, [0.05, 0.3, 1.5])
    assert labels[0.3][0] == labels[0.3][1] != labels[0.3][2]
    assert len(set(labels[1.5])) == 1
