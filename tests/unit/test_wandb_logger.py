"""The W&B logger of the metrics sink, in offline mode: step metrics and plot images land in the
offline run files, a requeued run continues the same run id, and a missing wandb package gives
a clear error only when wandb is asked for."""

import sys

import pytest

from ctpo_megatron.config.trainer import TrainerConfig, WandbConfig
from ctpo_megatron.trainer.metrics import MetricsSink, read_metrics
from ctpo_megatron.trainer.wandb_logger import RUN_ID_FILE
from tests._wandb_offline import offline_runs


@pytest.fixture
def offline(monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)


def _config(run_dir):
    from ctpo_megatron.config import load_config

    return load_config([f"trainer.run_dir={run_dir}", "trainer.loggers=[jsonl,wandb]",
                        "trainer.wandb.project=ctpo-test", "trainer.wandb.group=g1",
                        "trainer.wandb.tags=[tiny,cpu]"], config_name="tiny")


def _metrics(step):
    return {"reward/mean": 0.1 * step, "actor/loss": 1.0 / step, "eval/accuracy": 0.25 * step,
            "clip_rate_by_pos/4-7": 0.01, "is_ratio_p25": 0.9, "is_ratio_p50": 1.0, "is_ratio_p75": 1.1,
            "skipped": float("nan")}


def test_offline_run_holds_step_metrics_and_plots(offline, tmp_path):
    run_dir = tmp_path / "run1"
    cfg = _config(run_dir)
    sink = MetricsSink.from_config(cfg)
    for step in (1, 2, 3):
        sink.log(step, _metrics(step))
    sink.close()
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 3
    assert not (run_dir / "tensorboard").exists()  # not in trainer.loggers
    [run] = offline_runs(str(run_dir))
    assert run["finished"]
    assert run["run_id"] == (run_dir / RUN_ID_FILE).read_text().strip()
    assert (run["project"], run["name"], run["group"], run["tags"]) == ("ctpo-test", "run1", "g1",
                                                                          ["tiny", "cpu"])
    rows = {r["step"]: r for r in run["history"] if "reward/mean" in r}
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        assert row["reward/mean"] == pytest.approx(0.1 * step)
        assert row["actor/loss"] == pytest.approx(1.0 / step)
        assert "skipped" not in row  # non-finite values are left out, as in TensorBoard
    images = [r for r in run["history"] if "plots/reward/_type" in r]
    assert len(images) == 1 and images[0]["step"] == 3
    for name in ("reward", "clip_by_position", "ratio"):
        assert images[0][f"plots/{name}/_type"] == "image-file"
        stored = run_dir / "wandb" / run["dir"] / "files" / images[0][f"plots/{name}/path"]
        assert stored.is_file() and stored.read_bytes()[:4] == b"\x89PNG"


def test_requeued_run_continues_the_same_run_id(offline, tmp_path):
    run_dir = tmp_path / "run2"
    cfg = _config(run_dir)
    first = MetricsSink.from_config(cfg)
    for step in (1, 2, 3):  # the job is killed after step 3; its last checkpoint was step 2
        first.log(step, _metrics(step))
    first.close()
    second = MetricsSink.from_config(cfg, resume_step=3)
    for step in (3, 4):
        second.log(step, _metrics(step))
    second.close()
    runs = offline_runs(str(run_dir))
    assert len(runs) == 2 and runs[0]["run_id"] == runs[1]["run_id"]
    # Both runs may start within one second (folder names then do not order them): compare as a set.
    histories = sorted([r["step"] for r in run["history"] if "reward/mean" in r] for run in runs)
    assert histories == [[1, 2, 3], [3, 4]]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_missing_wandb_fails_only_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsSink(str(tmp_path / "a"), wandb=WandbConfig())
    with pytest.raises(ValueError, match="trainer.loggers includes wandb.*pip install wandb"):
        TrainerConfig(loggers=["jsonl", "wandb"]).check_loggers_installed()
    TrainerConfig().check_loggers_installed()  # the default loggers need nothing extra
    sink = MetricsSink(str(tmp_path / "b"), tensorboard=False)
    sink.log(1, {"x": 1.0})
    sink.close()


def test_loggers_setting_and_the_older_tensorboard_switch():
    assert TrainerConfig().loggers == ["jsonl", "tensorboard"]
    assert TrainerConfig(tensorboard=False).loggers == ["jsonl"]
    assert TrainerConfig(loggers=["jsonl", "wandb"], tensorboard=False).loggers == ["jsonl", "wandb"]
    assert TrainerConfig(loggers=["jsonl"], tensorboard=True).loggers == ["jsonl", "tensorboard"]
    with pytest.raises(ValueError, match="must include jsonl"):
        TrainerConfig(loggers=["tensorboard"])
    with pytest.raises(ValueError, match="unknown.*mlflow"):
        TrainerConfig(loggers=["jsonl", "mlflow"])
    with pytest.raises(ValueError, match="trainer.wandb.mode"):
        WandbConfig(mode="online-ish")
