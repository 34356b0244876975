"""grpo_advantages against a per-group loop written from the formula, and its edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from ctpo_megatron.algo import grpo_advantages


def loop_reference(rewards, ids, norm_by_std=True, eps=1e-6):
    groups = {}
    for r, g in zip(rewards, ids):
        groups.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, ids):
        values = groups[g]
        if len(values) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append((r - mean) / (std + eps) if norm_by_std else r - mean)
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_matches_loop_reference_with_interleaved_groups(norm_by_std):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (40,), generator=g)
    ids[0], ids[1] = 100, 101  # two single-response groups
    adv = grpo_advantages(rewards, ids, norm_by_std=norm_by_std)
    expected = loop_reference(rewards.tolist(), ids.tolist(), norm_by_std)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the same with string ids (prompt uids)
    adv_str = grpo_advantages(rewards, [f"uid-{i}" for i in ids.tolist()], norm_by_std=norm_by_std)
    torch.testing.assert_close(adv_str, adv, rtol=0, atol=0)


def test_singletons_and_zero_variance_groups():
    rewards = torch.tensor([0.7, 0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0], dtype=torch.float32)
    ids = ["solo", "same", "same", "same", "mix", "mix", "mix", "mix"]
    adv = grpo_advantages(rewards, ids)
    assert torch.isfinite(adv).all()
    assert adv[0].item() == pytest.approx(0.7 / (1 + 1e-6), rel=1e-6)  # mean 0, std 1
    assert adv[1:4].tolist() == [0.0, 0.0, 0.0]  # exactly zero, not rounding noise / 1e-6
    std = math.sqrt(4 * 0.25 / 3)
    torch.testing.assert_close(adv[4:], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-6))
    assert grpo_advantages(torch.tensor([3.0]), [0], norm_by_std=False).tolist() == [3.0]


def test_integer_rewards_and_bad_shapes():
    adv = grpo_advantages(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32 and adv[2:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(3), [0, 1])
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(2))
