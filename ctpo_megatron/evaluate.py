"""Scores a model on benchmark files: `python -m ctpo_megatron.evaluate [overrides]`.

    python -m ctpo_megatron.evaluate eval.model=/ckpt/Qwen3-4B \\
        eval.files=[aime25.parquet,aime26.parquet] eval.k=32 eval.temperature=0.7
    torchrun --nproc-per-node 8 -m ctpo_megatron.evaluate --config-name paper_qwen3_4b \\
        model.path=/ckpt/Qwen3-4B eval.checkpoint=runs/ctpo/checkpoints/latest eval.files=[...]

The same Hydra config groups as training (`--config-name`, model=, rollout=, ...), plus the
`eval.*` keys of `EvalConfig`. Trajectories come from the training path: the rollout servers
(`rollout.server_urls`, or embedded/SGLang servers started here), the agent loop with its
chat layout and sandbox, and the reward of `rollout.agent`. Files are verl-style parquet or
jsonl (`data.prompt_key`, `data.ground_truth_key`, `data.data_source_key`), string-encoded
`prompt` / `reward_model` columns included.

Per data source (and over all prompts) it reports, for k samples per prompt:
- mean@k: the mean correctness of all samples;
- best@k: the fraction of prompts with at least one correct sample;
- maj@k: the fraction of prompts whose most frequent final answer (last \\boxed{}, normalised;
  ties go to the answer seen first; samples without an answer do not vote) is correct.
All three use all k samples (no bootstrap over subsets). The table is printed and written
to `<eval.out_dir>/eval.jsonl` (one object per source) and `eval.md`. Training's periodic
evaluation reports the same numbers through `eval_metrics`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to evaluate (`eval.*` overrides)."""

    files: list[str] = field(default_factory=list)
    """Benchmark files (.parquet / .jsonl). Empty: `data.val_files`."""
    model: str = ""
    """Hugging Face model directory to evaluate (default: model.path)."""
    checkpoint: str = ""
    """A training run's checkpoint directory (`<run_dir>/checkpoints`): the policy is built
    from model.path with the configured layout (run under torchrun with a matching world
    size; any TP/PP works), the checkpoint `latest` points to is loaded, exported as a
    Hugging Face directory under out_dir, then evaluated by rank 0."""
    k: int = 32
    """Samples per prompt."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int = 1
    """Sampling seed base (per-request seeds derive from it: reruns reproduce)."""
    max_prompts: int = -1
    """At most this many prompts per file (-1: all)."""
    out_dir: str = "runs/eval"
    """Where eval.jsonl, eval.md, trajectories.jsonl and server logs go."""
    save_trajectories: bool = True
    """Also write every scored trajectory (text, reward, answer) to trajectories.jsonl."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"eval.k={self.k} must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"eval.temperature={self.temperature} must be > 0 and eval.top_p="
                             f"{self.top_p} in (0, 1]")
        for path in self.files:
            if not str(path).endswith((".parquet", ".jsonl", ".json")):
                raise ValueError(f"eval.files: {path!r} is not a .parquet or .jsonl file")


def final_answer(traj: dict) -> str | None:
    """The normalised final answer of a scored trajectory (its last \\boxed{}), for voting."""
    from ctpo_megatron.rollout.agent.reward import last_boxed
    from ctpo_megatron.rollout.agent.reward_checkers import strip_string

    answer = traj["answer"] if "answer" in traj else last_boxed(traj.get("response_text") or "")
    if answer is None:
        return None
    try:
        return strip_string(answer)
    except (ValueError, IndexError):
        return answer.strip()


def _group(trajs: Sequence[dict]) -> dict[str, dict[str, list[dict]]]:
    """source -> prompt uid -> its samples, in order."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for t in trajs:
        meta = t.get("metadata") or {}
        uid = meta.get("uid") or f"#{t.get('prompt_index', 0)}"
        groups.setdefault(meta.get("data_source", "unknown"), {}).setdefault(uid, []).append(t)
    return groups


def prompt_scores(samples: Sequence[dict]) -> tuple[float, float, float]:
    """(mean, best, maj) correctness of one prompt's samples (each a dict with `correct` and
    `answer`)."""
    hits = [bool(s.get("correct")) for s in samples]
    votes: Counter[str] = Counter()
    first_correct: dict[str, bool] = {}
    for s, hit in zip(samples, hits):
        ans = final_answer(s)
        if ans is not None:
            votes[ans] += 1
            first_correct.setdefault(ans, hit)
    maj = 0.0
    if votes:
        top = max(votes.values())
        winner = next(a for a in first_correct if votes[a] == top)  # first seen among the tied
        maj = float(first_correct[winner])
    return sum(hits) / len(hits), float(any(hits)), maj


def score_table(trajs: Sequence[dict], k: int) -> list[dict[str, Any]]:
    """One row per data source (sorted), then "all": prompts, samples, mean@k, best@k, maj@k
    (means over prompts of `prompt_scores`)."""
    rows = []
    everything: list[tuple[float, float, float]] = []
    n_samples = 0
    for source, prompts in sorted(_group(trajs).items()):
        scores = [prompt_scores(s) for s in prompts.values()]
        everything += scores
        n = sum(len(s) for s in prompts.values())
        n_samples += n
        rows.append(_row(source, scores, n, k))
    rows.append(_row("all", everything, n_samples, k))
    return rows


def _row(source: str, scores: list[tuple[float, float, float]], n_samples: int, k: int) -> dict[str, Any]:
    m = len(scores) or 1
    return {"source": source, "prompts": len(scores), "samples": n_samples, "k": k,
            f"mean@{k}": sum(s[0] for s in scores) / m, f"best@{k}": sum(s[1] for s in scores) / m,
            f"maj@{k}": sum(s[2] for s in scores) / m}


def eval_metrics(trajs: Sequence[dict], k: int, prefix: str = "eval/") -> dict[str, float]:
    """Flat metrics of `score_table`: `<prefix>mean@k`, `best@k`, `maj@k` over all prompts and
    `<prefix><source>/mean@k` ... per source (what training logs at each evaluation)."""
    out: dict[str, float] = {}
    for row in score_table(trajs, k):
        base = prefix if row["source"] == "all" else f"{prefix}{row['source']}/"
        for key in (f"mean@{k}", f"best@{k}", f"maj@{k}"):
            out[base + key] = float(row[key])
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of `score_table` as a Markdown table."""
    k = rows[0]["k"]
    cols = ["source", "prompts", "samples", f"mean@{k}", f"best@{k}", f"maj@{k}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: Sequence[dict[str, Any]], out_dir: str) -> tuple[str, str]:
    """Writes eval.jsonl and eval.md to `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl, md = os.path.join(out_dir, "eval.jsonl"), os.path.join(out_dir, "eval.md")
    with open(jsonl, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(md, "w") as f:
        f.write(markdown_table(rows))
    return jsonl, md


def run_eval(cfg: Any, ev: EvalConfig) -> list[dict[str, Any]]:
    """Samples `ev.k` trajectories per benchmark prompt with the rollout stack of `cfg`
    (a TrainConfig), scores them and writes the report; returns the table rows."""
    import dataclasses

    from ctpo_megatron.data.prompts import load_prompts
    from ctpo_megatron.trainer.rollout_driver import RolloutDriver

    files = list(ev.files) or list(cfg.data.val_files)
    if not files:
        raise ValueError("evaluate: no benchmark files: pass eval.files=[a.parquet,...] (or data.val_files)")
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"eval.files: {path!r} does not exist")
    model = ev.model or cfg.model.path
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"evaluate: {model!r} is not a Hugging Face model directory (no config.json); "
                         "pass eval.model=DIR or model.path=DIR")
    keys = dict(prompt_key=cfg.data.prompt_key, ground_truth_key=cfg.data.ground_truth_key,
                data_source_key=cfg.data.data_source_key)
    prompts = []
    for path in files:
        rows = load_prompts([path], **keys)
        prompts += rows[:ev.max_prompts] if ev.max_prompts >= 0 else rows
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model),
                              rollout=dataclasses.replace(cfg.rollout, top_p=ev.top_p))
    driver = RolloutDriver(cfg, run_dir=ev.out_dir)
    try:
        trajs = [t.to_dict() for t in driver.generate(prompts, ev.k, seed=ev.seed, temperature=ev.temperature)]
    finally:
        driver.close()
    rows = score_table(trajs, ev.k)
    jsonl, md = write_report(rows, ev.out_dir)
    if ev.save_trajectories:
        with open(os.path.join(ev.out_dir, "trajectories.jsonl"), "w") as f:
            for t in trajs:
                row = {k: t[k] for k in ("metadata", "sample_index", "response_text", "reward", "correct",
                                         "finish_reason", "tool_calls")}
                f.write(json.dumps({**row, "answer": final_answer(t)}) + "\n")
    print(markdown_table(rows), end="")
    logger.info("wrote %s and %s", jsonl, md)
    return rows


def _export_checkpoint(cfg: Any, checkpoint: str, out_dir: str) -> str:
    """Builds the policy as training does (all ranks), loads `checkpoint`, exports it as a
    Hugging Face directory under `out_dir`; returns that directory."""
    from ctpo_megatron.actor.policy import PolicyActor
    from ctpo_megatron.parallel.state import init_distributed

    if not os.path.isdir(checkpoint):
        raise ValueError(f"eval.checkpoint={checkpoint!r} is not a directory")
    _, world = init_distributed(timeout_minutes=cfg.trainer.collective_timeout_minutes)
    actor = PolicyActor(cfg.actor_config(cfg.validate(world)))
    actor.load_checkpoint(checkpoint, load_optimizer=False)
    hf_dir = os.path.join(out_dir, "hf_export")
    actor.export_hf(hf_dir)
    return hf_dir


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module doc)."""
    from omegaconf import OmegaConf

    from ctpo_megatron.config.store import load_config
    from ctpo_megatron.logging_utils import init_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print("eval.* keys (EvalConfig): " + ", ".join(EvalConfig.__dataclass_fields__))
        return 0
    config_name = "config"
    rest: list[str] = []
    eval_overrides: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--config-name":
            config_name = next(it)
        elif a.startswith("--config-name="):
            config_name = a.split("=", 1)[1]
        elif a.startswith(("eval.", "+eval.")):
            eval_overrides.append(a.lstrip("+")[len("eval."):])
        else:
            rest.append(a)
    init_logging()
    ev = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(eval_overrides)))
    cfg = load_config(rest, config_name=config_name)
    if ev.checkpoint:
        ev.model = _export_checkpoint(cfg, ev.checkpoint, ev.out_dir)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    run_eval(cfg, ev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
