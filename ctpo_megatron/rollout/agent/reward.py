"""Math answer reward. Mode "strict": the last `\\boxed{}` of a response checked with
math-verify. Mode "any" (the reference implementation's rule): correct when any of three
checkers accepts the response: MATH-style (last box, Hendrycks string normalisation),
DAPO-style (the last "Answer:" line in the final 300 characters, Minerva normalisation) and
math-verify on the whole text (LaTeX and plain expressions, several forms of the gold answer).

math-verify bounds its sympy work with `signal.alarm`, which only works in the main thread.
Off the main thread (rollout workers, thread pools) we run the same check in helper processes
that call it from their own main thread, so the timeout still holds.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
REWARD_MODES = ("strict", "any")
REWARD_SCOPES = ("generated", "response")


@dataclass
class RewardConfig:
    """Scores and penalties of `score_response`."""

    correct_score: float = 1.0
    """Score of a verified-correct answer."""
    incorrect_score: float = 0.0
    """Score of a wrong (or unparsable) boxed answer."""
    no_boxed_penalty: float = 0.0
    """Subtracted from `incorrect_score` when the response has no \\boxed{} at all (>= 0)."""
    truncated_penalty: float = 0.0
    """Subtracted when the response was cut by the length limit (finish_reason "length")."""
    max_answer_chars: int = 1000
    """Longer boxed answers are scored incorrect without parsing (sympy can take minutes
    on adversarial input)."""
    timeout_s: int = 5
    """math-verify's own per-call timeout (parsing and comparison), seconds."""
    mode: str = "strict"
    """"strict" (math-verify on the last box) or "any" (any checker accepts; the reference)."""
    scope: str = "generated"
    """Text scored (read by the agent loop): "generated" (the model's tokens only) or
    "response" (the whole response with tool outputs, special tokens dropped; the reference)."""

    def __post_init__(self) -> None:
        if self.mode not in REWARD_MODES:
            raise ValueError(f"RewardConfig.mode={self.mode!r}: expected one of {REWARD_MODES}")
        if self.scope not in REWARD_SCOPES:
            raise ValueError(f"RewardConfig.scope={self.scope!r}: expected one of {REWARD_SCOPES}")
        if self.no_boxed_penalty < 0 or self.truncated_penalty < 0:
            raise ValueError("RewardConfig: penalties are magnitudes and must be >= 0, got "
                             f"no_boxed_penalty={self.no_boxed_penalty}, "
                             f"truncated_penalty={self.truncated_penalty}")
        if self.timeout_s <= 0:
            raise ValueError(f"RewardConfig.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class RewardResult:
    """Outcome of scoring one response."""

    score: float
    """The reward (correct/incorrect score minus penalties)."""
    correct: bool
    """math-verify judged the last boxed answer equal to the ground truth."""
    has_boxed: bool
    """The response contains a complete \\boxed{...}."""
    answer: str | None
    """Content of the last \\boxed{...} (None when there is none)."""
    error: str | None = None
    """Why verification did not run or failed (timeout, parse error), if it did not."""


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces
    balanced; also accepts the brace-less `\\boxed 5`. None when there is none."""
    best: tuple[int, str] | None = None
    for cmd in _BOX_COMMANDS:
        start = text.rfind(cmd)
        while start >= 0:
            content = _box_content(text, start + len(cmd))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(cmd, 0, start)
    return None if best is None else best[1]


def _box_content(text: str, i: int) -> str | None:
    if i < len(text) and text[i] == " ":
        # "\boxed 5": the argument runs to the next whitespace or "$".
        rest = text[i + 1:]
        token = rest.split()[0] if rest.split() else ""
        token = token.split("$")[0]
        return token or None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the box was never closed


def _verify_main_thread(answer: str, ground_truth: str, timeout_s: int) -> bool:
    """math-verify equality of two LaTeX answers; must run in a main thread (signals)."""
    from math_verify import parse, verify  # heavy import (sympy), deferred

    gold_text = ground_truth.strip()
    if "\\boxed" not in gold_text and "$" not in gold_text:
        gold_text = f"\\boxed{{{gold_text}}}"
    gold = parse(gold_text, parsing_timeout=timeout_s)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
    if not gold:
        raise ValueError(f"math-verify could not parse the ground truth {ground_truth!r}")
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout_s))


def _gold_candidates(ground_truth: str) -> list[str]:
    """Forms of the gold answer tried by the whole-text check: as given, integers without
    leading zeros, without $...$, and boxed."""
    raw = str(ground_truth).strip()
    sign, body = (raw[0], raw[1:]) if raw[:1] in ("+", "-") else ("", raw)
    norm = f"{sign}{int(body)}" if body.isdigit() else raw
    out: list[str] = []
    for c in (raw, norm, norm[1:-1].strip() if len(norm) >= 2 and norm[0] == norm[-1] == "$" else "",
              "" if "\\boxed{" in norm or not norm else f"\\boxed{{{norm}}}"):
        if c and c not in out:
            out.append(c)
    return out


def _verify_text_main_thread(text: str, ground_truth: str, timeout_s: int) -> bool:
    """math-verify over a whole response: the last LaTeX or plain expression answer in it
    against any form of the gold answer; must run in a main thread (signals)."""
    from math_verify.errors import TimeoutException
    from math_verify.metric import math_metric
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    check = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
    for gold in _gold_candidates(ground_truth):
        try:
            if check([gold], [text])[0] >= 1.0:
                return True
        except (TimeoutException, ValueError):  # no parsable gold in this form: try the next
            continue
    return False


_CHECKS = {"box": _verify_main_thread, "text": _verify_text_main_thread}


class _VerifyWorker:
    """A helper process (`python -m ctpo_megatron.rollout.agent.reward --worker`) that runs
    `_verify_main_thread` in its own main thread, one JSON request/answer line at a time.

    A plain subprocess rather than multiprocessing: it never re-imports the caller's
    `__main__`, and a stuck sympy call is ended by killing the process.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctpo_megatron.rollout.agent.reward", "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, bufsize=1)

    def call(self, answer: str, ground_truth: str, timeout_s: int, deadline_s: float,
             kind: str = "box") -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([kind, answer, ground_truth, timeout_s]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], deadline_s)
        if not ready:
            raise TimeoutError(f"verification worker gave no answer within {deadline_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"verification worker exited with status {self.proc.poll()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return bool(reply["equal"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


MAX_VERIFY_WORKERS = min(8, os.cpu_count() or 1)
"""Most helper processes verifying at once (callers beyond it wait)."""
_SLOTS = threading.BoundedSemaphore(MAX_VERIFY_WORKERS)
_IDLE: queue.SimpleQueue[_VerifyWorker] = queue.SimpleQueue()
_ALL: list[_VerifyWorker] = []
_ALL_LOCK = threading.Lock()


def _shutdown_workers() -> None:
    with _ALL_LOCK:
        for w in _ALL:
            w.kill()
        _ALL.clear()


atexit.register(_shutdown_workers)


def _verify_in_worker(answer: str, ground_truth: str, timeout_s: int, kind: str = "box") -> bool:
    with _SLOTS:  # bounds the helper processes (each holds sympy, ~100 MB)
        return _verify_on_idle_worker(answer, ground_truth, timeout_s, kind)


def _verify_on_idle_worker(answer: str, ground_truth: str, timeout_s: int, kind: str) -> bool:
    try:
        worker = _IDLE.get_nowait()
    except queue.Empty:
        worker = _VerifyWorker()
        with _ALL_LOCK:
            _ALL.append(worker)
    try:
        # Parsing and verifying each have their own timeout inside the worker; the slack
        # covers the worker's first import of sympy.
        result = worker.call(answer, ground_truth, timeout_s, deadline_s=3 * timeout_s + 30, kind=kind)
    except (TimeoutError, RuntimeError, OSError):
        worker.kill()  # stuck or dead: never reuse it
        with _ALL_LOCK:
            _ALL.remove(worker)
        raise
    except ValueError:
        _IDLE.put(worker)
        raise
    _IDLE.put(worker)
    return result


def _verify(answer: str, ground_truth: str, timeout_s: int, kind: str = "box") -> bool:
    if threading.current_thread() is threading.main_thread():
        return _CHECKS[kind](answer, ground_truth, timeout_s)
    return _verify_in_worker(answer, ground_truth, timeout_s, kind)


def score_response(response_text: str, ground_truth: str, config: RewardConfig | None = None, *,
                   truncated: bool = False) -> RewardResult:
    """Scores `response_text` against `ground_truth` by its last \\boxed{} answer.

    truncated: the response hit the length limit (applies `truncated_penalty`).
    Safe from any thread. Verification errors and timeouts score as incorrect and are
    reported in `RewardResult.error`; a ground truth math-verify cannot parse is an error too.
    """
    cfg = config or RewardConfig()
    if cfg.mode == "any":
        return _score_any(response_text, ground_truth, cfg, truncated)
    answer = last_boxed(response_text)
    penalty = cfg.truncated_penalty if truncated else 0.0
    if answer is None:
        return RewardResult(cfg.incorrect_score - cfg.no_boxed_penalty - penalty, False, False, None)
    error = None
    correct = False
    if len(answer) > cfg.max_answer_chars:
        error = f"boxed answer longer than max_answer_chars={cfg.max_answer_chars}"
    else:
        try:
            correct = _verify(answer, ground_truth, cfg.timeout_s)
        except TimeoutError as e:
            error = f"math-verify timed out: {e!r}"
        except Exception as e:  # noqa: BLE001 - a reward must not kill the rollout batch
            error = f"math-verify failed: {e!r}"
            logger.warning("reward: %s (answer=%r, ground_truth=%r)", error, answer[:200], ground_truth[:200])
    score = (cfg.correct_score if correct else cfg.incorrect_score) - penalty
    return RewardResult(score, correct, True, answer, error)


def _score_any(text: str, ground_truth: str, cfg: RewardConfig, truncated: bool) -> RewardResult:
    """The reference's rule: correct when any checker accepts (cheap string checks first)."""
    from ctpo_megatron.rollout.agent.reward_checkers import dapo_style_correct, math_style_correct

    answer = last_boxed(text)
    penalty = cfg.truncated_penalty if truncated else 0.0
    error = None
    correct = math_style_correct(text, ground_truth) or dapo_style_correct(text, ground_truth)
    if not correct:
        try:
            correct = _verify(text, ground_truth, cfg.timeout_s, kind="text")
        except TimeoutError as e:
            error = f"math-verify timed out: {e!r}"
        except Exception as e:  # noqa: BLE001 - a reward must not kill the rollout batch
            error = f"math-verify failed: {e!r}"
    if correct:
        score = cfg.correct_score
    else:
        score = cfg.incorrect_score - (cfg.no_boxed_penalty if answer is None else 0.0)
    return RewardResult(score - penalty, correct, answer is not None, answer, error)


def math_reward(response_text: str, ground_truth: str) -> float:
    """1.0 when the last \\boxed{} answer of `response_text` equals `ground_truth`
    (math-verify: fractions, LaTeX forms, intervals, sets...), else 0.0."""
    return 1.0 if score_response(response_text, ground_truth).correct else 0.0


def _worker_main() -> None:
    """Serves `_verify_main_thread` over stdin/stdout JSON lines (see `_VerifyWorker`)."""
    for line in sys.stdin:
        kind, answer, ground_truth, timeout_s = json.loads(line)
        try:
            reply = {"equal": _CHECKS[kind](answer, ground_truth, timeout_s)}
        except Exception as e:  # noqa: BLE001 - reported to the caller
            reply = {"error": repr(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
