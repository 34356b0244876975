"""PolicyLossConfig defaults and validation, and the `algo` Hydra YAMLs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctpo_megatron.algo import PolicyLossConfig, RolloutCorrectionConfig

ALGO_DIR = Path(__file__).resolve().parents[2] / "configs" / "algo"


def test_defaults_are_the_paper_run():
    cfg = PolicyLossConfig()
    assert (cfg.name, cfg.variant, cfg.adaptive_clip, cfg.loss_agg_mode) == ("ctpo", "cumprod", True, "token-mean")
    assert (cfg.la_clip_low, cfg.la_clip_high, cfg.la_clip_c, cfg.la_power) == (0.025, 0.05, 0.05, 0.5)
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.2, 0.2, 3.0)
    rc = RolloutCorrectionConfig()
    assert (rc.level, rc.mode, rc.threshold, rc.normalize) == ("sequence", "truncate", 5.0, False)


@pytest.mark.parametrize("field, value", [
    ("name", "ppo"), ("variant", "mean"), ("loss_agg_mode", "sum"), ("la_clip_low", 0.0),
    ("la_clip_high", -0.1), ("la_clip_c", float("inf")), ("la_power", float("nan")),
    ("clip_ratio_low", 1.5), ("clip_ratio_high", -0.2), ("clip_ratio_c", 1.0),
])
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("level", "batch"), ("mode", "clip"), ("threshold", 0.0)])
def test_invalid_rollout_correction_raises(field, value):
    with pytest.raises(ValueError, match=field):
        RolloutCorrectionConfig(**{field: value})


EXPECTED = {
    "ctpo": {},
    "ctpo_geomean": {"variant": "geomean", "la_power": -0.5},  # the reference's comment: -0.5
    "ctpo_noadapt": {"adaptive_clip": False},
    "grpo": {"name": "grpo", "adaptive_clip": False},
    "gspo": {"name": "gspo", "adaptive_clip": False, "loss_agg_mode": "seq-mean-token-mean",
             "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},  # GSPO's published clip
    "seq": {"name": "seq", "adaptive_clip": False},
}


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_yaml_group_builds_the_expected_config(stem):
    raw = OmegaConf.load(ALGO_DIR / f"{stem}.yaml")
    fields = {f.name for f in dataclasses.fields(PolicyLossConfig)}
    assert set(raw.keys()) == fields  # flat keys, exactly the dataclass fields
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PolicyLossConfig), raw))
    assert cfg == PolicyLossConfig(**EXPECTED[stem])


def test_yaml_group_is_complete():
    assert {p.stem for p in ALGO_DIR.glob("*.yaml")} == set(EXPECTED)
