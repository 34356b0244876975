"""`python -m ctpo_megatron.evaluate`: mean@k / best@k / maj@k by hand, and a real run of the
entry point (embedded CPU server, agent loop, sandbox, reward) on verl-style parquet files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ctpo_megatron.data.prompts import write_rows
from ctpo_megatron.evaluate import EvalConfig, eval_metrics, markdown_table, prompt_scores, score_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _t(source, uid, correct, answer):
    return {"metadata": {"data_source": source, "uid": uid}, "correct": correct, "answer": answer}


def test_mean_best_maj_by_hand():
    trajs = [
        # p1: 1 of 4 correct; answers 5, 7, 7, None -> majority "7" (wrong).
        _t("A", "p1", True, "5"), _t("A", "p1", False, "7"), _t("A", "p1", False, "7"), _t("A", "p1", False, None),
        # p2: 2 of 4 correct; "\frac12" and "1/2" normalise to the same answer and win.
        _t("A", "p2", True, "\\frac12"), _t("A", "p2", True, "1/2"), _t("A", "p2", False, "3"),
        _t("A", "p2", False, None),
        # p3 (other source): none correct, no answers at all.
        _t("B", "p3", False, None), _t("B", "p3", False, None), _t("B", "p3", False, None),
        _t("B", "p3", False, None),
    ]
    assert prompt_scores(trajs[0:4]) == (0.25, 1.0, 0.0)
    assert prompt_scores(trajs[4:8]) == (0.5, 1.0, 1.0)
    assert prompt_scores(trajs[8:12]) == (0.0, 0.0, 0.0)
    # A tie goes to the answer seen first.
    assert prompt_scores([_t("A", "q", False, "2"), _t("A", "q", True, "3")])[2] == 0.0
    rows = {r["source"]: r for r in score_table(trajs, 4)}
    assert rows["A"] == {"source": "A", "prompts": 2, "samples": 8, "k": 4, "mean@4": 0.375, "best@4": 1.0,
                         "maj@4": 0.5}
    assert rows["B"]["mean@4"] == 0.0 and rows["B"]["prompts"] == 1
    assert rows["all"]["mean@4"] == pytest.approx(0.75 / 3) and rows["all"]["best@4"] == pytest.approx(2 / 3)
    assert rows["all"]["maj@4"] == pytest.approx(1 / 3)
    m = eval_metrics(trajs, 4)
    assert m["eval/mean@4"] == rows["all"]["mean@4"] and m["eval/A/maj@4"] == 0.5
    md = markdown_table(score_table(trajs, 4))
    assert md.splitlines()[0] == "| source | prompts | samples | mean@4 | best@4 | maj@4 |"
    assert "| A | 2 | 8 | 0.3750 | 1.0000 | 0.5000 |" in md
    with pytest.raises(ValueError, match="eval.k=0"):
        EvalConfig(k=0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from ctpo_megatron.data.tiny_model import TinyModelConfig, build_tiny_model, save_tiny_model
    from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer

    out = str(tmp_path_factory.mktemp("evalmodel"))
    tok = build_char_tokenizer(out)
    model = build_tiny_model(TinyModelConfig(), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_tiny_model(model, tok, out)
    return out


def test_entry_point_on_verl_parquet(tiny_model_dir, tmp_path):
    # verl-style rows: chat prompt + reward_model struct, and a file whose `prompt` and
    # `reward_model` columns are strings (JSON / Python literal), as some writers store them.
    a = write_rows([{"data_source": "arith", "prompt": [{"role": "user", "content": f"{i}+1=?"}],
                     "reward_model": {"ground_truth": str(i + 1), "style": "rule"}} for i in range(2)],
                   str(tmp_path / "a.parquet"))
    b = write_rows([{"data_source": "strs", "prompt": json.dumps([{"role": "user", "content": "2*3=?"}]),
                     "reward_model": str({"ground_truth": "6", "style": "rule"})}], str(tmp_path / "b.parquet"))
    out = str(tmp_path / "eval")
    cmd = [sys.executable, "-m", "ctpo_megatron.evaluate", "--config-name", "tiny",
           f"eval.model={tiny_model_dir}", f"eval.files=[{a},{b}]", "eval.k=2", "eval.temperature=0.7",
           f"eval.out_dir={out}", "rollout.max_response_len=24", "rollout.agent.reward_mode=any"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| source | prompts | samples | mean@2 | best@2 | maj@2 |" in res.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
    assert [(r["source"], r["prompts"], r["samples"]) for r in rows] == [("arith", 2, 4), ("strs", 1, 2), ("all", 3, 6)]
    trajs = [json.loads(line) for line in open(os.path.join(out, "trajectories.jsonl"))]
    assert len(trajs) == 6 and {t["metadata"]["data_source"] for t in trajs} == {"arith", "strs"}
    assert rows[-1]["mean@2"] == sum(bool(t["correct"]) for t in trajs) / 6
    assert open(os.path.join(out, "eval.md")).read() in res.stdout
