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


def test_plot_command_draws_pngs(tmp_path, capsys):
    _fake_run(tmp_path)
    assert plot.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == ["reward.png", "clip_by_position.png", "ratio.png"]
    for path in printed:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 5000  # a drawn figure, not an empty canvas


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
