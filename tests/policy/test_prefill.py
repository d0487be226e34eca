"""The prefill-first rule of ``SGLangStepGenerator`` (issue 15 section 4), pure: which prefixes
of a call are sent prefill-only before its batch, and how their accounting is folded into the
samples. The engine side (the batch finds the prefix cached) is in tests/policy/test_generator.py."""
from __future__ import annotations

from ets.policy.client import Sample
from ets.policy.generator import fold_prefill, prefixes_to_prefill
from ets.search.interfaces import ExpandRequest, SampledStep

ROOT = (1, 2, 3, 4)


def _step(prompt: int, cached: int, ids: tuple[int, ...] = (9,)) -> SampledStep:
    return SampledStep(token_ids=ids, text="x", finish="step", prompt_tokens=prompt, cached_tokens=cached)


def _sample(prompt: int, cached: int) -> Sample:
    return Sample(output_ids=(), text="", finish="length", matched=None, prompt_tokens=prompt,
                  completion_tokens=0, cached_tokens=cached)


def test_root_fan_out_is_prefilled_once() -> None:
    assert prefixes_to_prefill([ExpandRequest(ROOT, 16)], set()) == [ROOT]


def test_a_single_sample_or_a_zero_n_node_is_not_prefilled() -> None:
    assert prefixes_to_prefill([ExpandRequest(ROOT, 1)], set()) == []
    assert prefixes_to_prefill([ExpandRequest(ROOT, 0), ExpandRequest(ROOT + (5,), 1)], set()) == []


def test_samples_of_one_prefix_are_summed_over_requests() -> None:
    # Two subtrees (DVTS) rooted at the same prompt, one sample each: two samples share it.
    assert prefixes_to_prefill([ExpandRequest(ROOT, 1), ExpandRequest(list(ROOT), 1)], set()) == [ROOT]


def test_children_of_the_previous_call_are_not_prefilled() -> None:
    a, b = ROOT + (5, 6), ROOT + (7,)
    replayed = ROOT + (8,)  # e.g. a node whose sample came from a store, not from this generator
    got = prefixes_to_prefill([ExpandRequest(a, 4), ExpandRequest(b, 3), ExpandRequest(replayed, 2)], {a, b})
    assert got == [replayed]


def test_order_is_first_seen_and_min_shared_zero_turns_it_off() -> None:
    a, b = ROOT + (5,), ROOT + (6,)
    reqs = [ExpandRequest(b, 2), ExpandRequest(a, 3), ExpandRequest(b, 1)]
    assert prefixes_to_prefill(reqs, set()) == [b, a]
    assert prefixes_to_prefill(reqs, set(), min_shared=4) == []
    assert prefixes_to_prefill(reqs, set(), min_shared=0) == []
    # A one-token prompt has nothing to share (the engine computes the last prompt token anyway).
    assert prefixes_to_prefill([ExpandRequest((1,), 5)], set()) == []


def test_fold_adds_the_prefill_to_the_first_sample_of_its_prefix_only() -> None:
    a = ROOT + (5,)
    reqs = [ExpandRequest(ROOT, 0), ExpandRequest(ROOT, 2), ExpandRequest(a, 2), ExpandRequest(ROOT, 1)]
    out = [[], [_step(4, 3), _step(4, 3)], [_step(5, 4), _step(5, 4)], [_step(4, 3)]]
    folded = fold_prefill(out, reqs, {ROOT: _sample(4, 0)})
    assert [[(s.prompt_tokens, s.cached_tokens) for s in x] for x in folded] == [
        [], [(8, 3), (4, 3)], [(5, 4), (5, 4)], [(4, 3)]]
    # Sums over samples equal the engine's counts of all requests sent (prefill included).
    assert sum(s.prompt_tokens for x in folded for s in x) == 4 + 4 * 3 + 5 * 2
    assert folded[1][0].token_ids == (9,) and folded[1][0].finish == "step"
