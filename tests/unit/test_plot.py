"""Metrics sink (JSONL + TensorBoard, resume truncation) and the plot command on real files."""

import json
import math
import os

import pytest

from ctpo_megatron import plot
from ctpo_megatron.trainer.metrics import MetricsSink, mean_metrics, read_metrics


def _fake_run(run_dir, steps=12):
    sink = MetricsSink(str(run_dir), tensorboard=True)
    for step in range(steps + 1):
        m = {"reward/mean": 0.2 + 0.05 * step, "actor/is_ratio_p50": 1.0,
             "actor/is_ratio_p25": 0.98, "actor/is_ratio_p75": 1.02,
             "actor/is_ratio_min": 0.8 - 0.01 * step, "actor/is_ratio_max": 1.2 + 0.01 * step,
             "clip_rate_by_pos/1-1": 0.0, "clip_rate_by_pos/2-3": 0.01 * step,
             "clip_rate_by_pos/4+": 0.02 * step, "time/rollout": 1.5}
        if step % 4 == 0:
            m["eval/accuracy"] = 0.25 + 0.04 * step
        sink.log(step, m)
    sink.close()


def test_sink_writes_jsonl_and_tensorboard(tmp_path):
    _fake_run(tmp_path, steps=3)
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[2]["reward/mean"] == pytest.approx(0.3)
    assert "eval/accuracy" in records[0] and "eval/accuracy" not in records[1]
    events = os.listdir(os.path.join(tmp_path, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_sink_resume_drops_steps_after_checkpoint_and_torn_lines(tmp_path):
    _fake_run(tmp_path, steps=5)
    with open(os.path.join(tmp_path, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "reward/me')  # killed mid-write
    sink = MetricsSink(str(tmp_path), tensorboard=False, resume_step=4)  # checkpoint after step 3
    sink.log(4, {"reward/mean": 0.9, "bad": math.nan})
    sink.close()
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["reward/mean"] == 0.9 and records[-1]["bad"] is None


def test_mean_metrics_over_missing_keys():
    assert mean_metrics([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}


def _drawn_figures(monkeypatch) -> dict[str, object]:
    """Captures each figure as plot.py finishes it (file name -> its only Axes)."""
    axes = {}
    finish = plot._finish

    def capture(fig, ax, out, **kwargs):
        axes[os.path.basename(out)] = ax
        finish(fig, ax, out, **kwargs)

    monkeypatch.setattr(plot, "_finish", capture)
    return axes


def _line(ax, label):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def test_plot_command_draws_the_metrics(tmp_path, capsys, monkeypatch):
    _fake_run(tmp_path)
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    axes = _drawn_figures(monkeypatch)
    assert plot.main([str(tmp_path), "--summary"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [os.path.basename(p) for p in printed[:3]] == ["reward.png", "clip_by_position.png", "ratio.png"]
    for path in printed[:3]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The README's promised last line: first and last evaluation (steps 0 and 12).
    assert printed[-1] == ("held-out accuracy: 0.25 -> 0.73 (step 0 -> step 12, "
                           "mean@k over the held-out set)")

    steps = [r["step"] for r in records]
    assert _line(axes["reward.png"], "train reward (mean)") == (steps, [r["reward/mean"] for r in records])
    evals = [r for r in records if "eval/accuracy" in r]
    assert _line(axes["reward.png"], "held-out accuracy (mean@k)") == (
        [r["step"] for r in evals], [r["eval/accuracy"] for r in evals])

    # Clip rate by position: first, middle and last step, x = bucket start, y = the rates.
    clip = axes["clip_by_position.png"]
    for step in (0, 6, 12):
        r = records[step]
        assert _line(clip, f"step {step}") == (
            [1, 2, 4], [r["clip_rate_by_pos/1-1"], r["clip_rate_by_pos/2-3"], r["clip_rate_by_pos/4+"]])

    ratio = axes["ratio.png"]
    assert _line(ratio, "median") == (steps, [r["actor/is_ratio_p50"] for r in records])
    bands = {c.get_label(): c for c in ratio.collections}
    assert set(bands) == {"p25-p75", "min-max"}
    outline = bands["min-max"].get_paths()[0].vertices  # lows left to right, then highs back
    ys = sorted(set(round(float(y), 9) for y in outline[:, 1]))
    want = sorted(set(round(r[k], 9) for r in records for k in ("actor/is_ratio_min", "actor/is_ratio_max")))
    assert ys == want


@pytest.mark.parametrize("drop,figure", [("reward/mean", None), ("clip_rate_by_pos", "clip_by_position.png"),
                                         ("is_ratio", "ratio.png"), ("", "reward.png")])
def test_plot_without_a_figures_metrics_is_an_error(tmp_path, drop, figure):
    _fake_run(tmp_path, steps=3)
    path = os.path.join(tmp_path, "metrics.jsonl")
    records = read_metrics(path)
    if drop:
        records = [{k: v for k, v in r.items() if drop not in k} for r in records]
    else:  # no metric at all but the step
        records = [{"step": r["step"]} for r in records]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if figure is None:  # eval/accuracy alone still makes a reward figure
        assert len(plot.plot_run(str(tmp_path))) == 3
        return
    with pytest.raises(ValueError, match=rf"metrics.jsonl: nothing to draw for .*{figure}"):
        plot.plot_run(str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "plots", figure))


def test_position_rates_parse_bucket_labels():
    rec = {"clip_rate_by_pos/1-1": 0.1, "clip_rate_by_pos/16+": 0.4, "clip_rate_by_pos/2-3": 0.2,
           "clip_rate_by_pos/4-7": None, "reward/mean": 1.0}
    assert plot._position_rates(rec, "clip_rate_by_pos") == [(1, 0.1), (2, 0.2), (16, 0.4)]


def test_plot_rejects_non_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot.plot_run(str(tmp_path))


def test_metrics_file_is_plain_json_lines(tmp_path):
    _fake_run(tmp_path, steps=1)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert all(isinstance(json.loads(line), dict) for line in f)


def test_asynchronous_runs_get_a_staleness_figure(tmp_path, monkeypatch):
    _fake_run(tmp_path, steps=3)
    path = os.path.join(tmp_path, "metrics.jsonl")
    assert "staleness.png" not in [os.path.basename(p) for p in plot.plot_run(str(tmp_path))]  # synchronous
    records = read_metrics(path)
    for r in records[1:]:  # step 1: all fresh; later steps: a quarter one version behind, 2 tokens masked
        late = r["step"] > 1
        r.update({"staleness/mean": 0.25 * late, "staleness/0": 1.0 - 0.25 * late,
                  "tokens_per_version/0": 40.0, "stale/masked_tokens": 2.0 * late})
        if late:
            r.update({"staleness/1": 0.25, "tokens_per_version/1": 40.0})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    axes = _drawn_figures(monkeypatch)
    assert os.path.basename(plot.plot_run(str(tmp_path))[-1]) == "staleness.png"
    ax = axes["staleness.png"]
    assert _line(ax, "0 versions behind") == ([1, 2, 3], [1.0, 0.75, 0.75])
    assert _line(ax, "1 version behind") == ([1, 2, 3], [0.0, 0.25, 0.25])
    assert _line(ax, "taken out of the loss (stale_policy)") == ([1, 2, 3], [0.0, 2 / 80, 2 / 80])
