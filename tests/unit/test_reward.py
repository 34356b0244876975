"""Math reward: a table of equal / unequal answer pairs, boxed extraction, penalties, threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ctpo_megatron.rollout.agent.reward import RewardConfig, last_boxed, math_reward, score_response

EQUAL = [
    ("The answer is \\boxed{42}.", "42"),
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{1/2}", "\\frac12"),
    ("\\boxed{(0, 1]}", "(0,1]"),
    ("\\boxed{[2, \\infty)}", "[2,\\infty)"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{x = 5}", "5"),
    ("first \\boxed{3} then \\boxed{7}", "7"),          # the LAST box counts
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}"),
    ("\\boxed{\\pi}", "\\pi"),
    ("\\boxed{10^{3}}", "1000"),
    ("\\boxed 5", "5"),
    ("\\boxed{-\\frac{\\sqrt{3}}{2}}", "-\\frac{\\sqrt3}{2}"),
    ("\\fbox{12}", "12"),
]
UNEQUAL = [
    ("\\boxed{41}", "42"),
    ("\\boxed{7} then \\boxed{3}", "7"),
    ("The answer is 42", "42"),                          # no box, no credit
    ("\\boxed{(0, 1)}", "(0,1]"),
    ("\\boxed{\\frac{1}{3}}", "0.33"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ("\\boxed{42", "42"),                                # never closed
    ("\\boxed{x^2}", "x^3"),
]


@pytest.mark.parametrize("response,truth", EQUAL)
def test_equal_pairs_score_one(response, truth):
    assert math_reward(response, truth) == 1.0


@pytest.mark.parametrize("response,truth", UNEQUAL)
def test_unequal_pairs_score_zero(response, truth):
    assert math_reward(response, truth) == 0.0


def test_last_boxed_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{1} \\boxed{2}") == "2"
    assert last_boxed("\\boxed{1} \\boxed{2") == "1"        # an unclosed last box is skipped
    assert last_boxed("\\boxed{1} and $\\boxed 7$") == "7"
    assert last_boxed("no answer") is None


def test_score_fields_and_penalties():
    cfg = RewardConfig(no_boxed_penalty=0.5, truncated_penalty=0.25)
    assert score_response("no box", "1", cfg).score == -0.5
    res = score_response("\\boxed{1}", "1", cfg, truncated=True)
    assert (res.score, res.correct, res.has_boxed, res.answer, res.error) == (0.75, True, True, "1", None)
    long = score_response("\\boxed{" + "1+" * 600 + "1}", "1201", RewardConfig(max_answer_chars=100))
    assert not long.correct and "max_answer_chars" in long.error
    bad_truth = score_response("\\boxed{1}", "", cfg)
    assert not bad_truth.correct and "ground truth" in bad_truth.error
    with pytest.raises(ValueError, match="penalt"):
        RewardConfig(no_boxed_penalty=-1.0)


def test_same_answers_from_worker_threads():
    # math-verify's signal timeouts only work in the main thread; off it we use helper processes.
    pairs = EQUAL[:6] + UNEQUAL[:6]
    expected = [1.0] * 6 + [0.0] * 6
    with ThreadPoolExecutor(max_workers=3) as ex:
        got = list(ex.map(lambda p: math_reward(*p), pairs))
    assert got == expected


def test_stuck_helper_process_times_out():
    from ctpo_megatron.rollout.agent.reward import _VerifyWorker

    worker = _VerifyWorker()
    try:
        # Its first answer needs sympy imported (far longer than 10 ms): the caller gives up.
        with pytest.raises(TimeoutError, match="no answer"):
            worker.call("1", "1", 5, deadline_s=0.01)
    finally:
        worker.kill()
    assert worker.proc.poll() is not None


def test_helper_processes_are_bounded():
    from ctpo_megatron.rollout.agent import reward

    with ThreadPoolExecutor(max_workers=4 * reward.MAX_VERIFY_WORKERS) as ex:
        got = list(ex.map(lambda p: math_reward(*p), EQUAL * 2))
    assert got == [1.0] * (2 * len(EQUAL))
    assert 1 <= len(reward._ALL) <= reward.MAX_VERIFY_WORKERS


def test_any_checker_mode_accepts_what_one_checker_accepts():
    from ctpo_megatron.rollout.agent.reward import RewardConfig
    from ctpo_megatron.rollout.agent.reward_checkers import dapo_style_correct, math_style_correct, strip_string

    anyc = RewardConfig(mode="any")
    # MATH-style normalisation: \dfrac, shorthand \frac12, a/b, 0.5, units after "\text{ ".
    assert strip_string("\\dfrac{1}{2}") == strip_string("\\frac12") == strip_string("1/2") == "\\frac{1}{2}"
    assert math_style_correct("so \\boxed{10 \\text{ cm}}", "10")
    # DAPO-style: the last "Answer:" line of the final 300 characters.
    assert dapo_style_correct("work...\nAnswer: $1,000$", "1000")
    assert not dapo_style_correct("Answer: 5" + "." * 400, "5")
    cases = [("\\boxed{\\dfrac{1}{2}}", "0.5", True),   # MATH-style (strict also accepts)
             ("Answer: 70", "70", True),                 # DAPO-style only: no box
             ("hence $x = 70$.", "070", True),           # math-verify on the whole text
             ("\\boxed{71}", "70", False)]
    for text, truth, want in cases:
        res = score_response(text, truth, anyc)
        assert res.correct is want and res.score == float(want), (text, res)
    assert not score_response("Answer: 70", "70").correct  # strict: no box, no credit
    with pytest.raises(ValueError, match="mode"):
        RewardConfig(mode="some")
