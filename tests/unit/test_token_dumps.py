"""Per-token ratio dumps: bounded compressed files, and the two figures drawn from them
(std of log rho_t with a sigma sqrt(t) fit; clip rate by exact position, fixed vs LA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctpo_megatron.plot import ClipSettings, clip_rates_by_position, plot_dumps, sqrt_t_fit
from ctpo_megatron.trainer.dumps import TokenDumper, load_token_dumps, token_arrays, write_token_dump


def _loss_inputs(b=400, t=64, sigma=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen)
    logp = old + sigma * torch.randn(b, t, generator=gen)  # delta_t ~ N(0, sigma^2), independent
    mask = torch.ones(b, t)
    mask[:, 10:13] = 0  # a tool-output run inside every response
    lengths = torch.randint(min(20, t), t + 1, (b,), generator=gen)
    mask[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    adv = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0)[:, None].expand(b, t)
    return logp, old, adv, mask


def test_dump_round_trip_positions_and_budget(tmp_path):
    logp, old, adv, mask = _loss_inputs(b=6, t=16)
    arr = token_arrays(logp, old, adv, mask)
    path = write_token_dump(str(tmp_path / "token_dumps" / "step_0000003_rank_0.npz"), step=3,
                            **{k: arr[k] for k in ("log_ratio", "cum_log_ratio", "position", "mask")},
                            advantages=arr["advantages"])
    d = load_token_dumps(str(tmp_path))
    assert int(d["step"]) == 3 and len(d["log_ratio"]) == int(mask.sum())
    row0 = slice(d["row_offsets"][0], d["row_offsets"][1])
    valid0 = mask[0] > 0
    # Positions count generated tokens only; the cumulative log ratio is their running sum.
    assert d["position"][row0].tolist() == list(range(1, int(valid0.sum()) + 1))
    assert d["token_index"][row0].tolist() == torch.nonzero(valid0).flatten().tolist()
    delta = (logp[0] - old[0])[valid0].double()
    np.testing.assert_allclose(d["cum_log_ratio"][row0], torch.cumsum(delta, 0).numpy(), rtol=1e-5, atol=1e-6)
    # Bounded: whole sequences until the budget.
    write_token_dump(path, step=3, max_tokens=20, **{k: arr[k] for k in ("log_ratio", "cum_log_ratio",
                                                                          "position", "mask")},
                     advantages=arr["advantages"])
    d = load_token_dumps(str(tmp_path), 3)
    lengths = np.diff(d["row_offsets"])
    assert d["row_offsets"][-1] <= 20 and set(lengths) <= set(mask.sum(1).int().tolist())
    with pytest.raises(FileNotFoundError, match="dumped steps: \\[3\\]"):
        load_token_dumps(str(tmp_path), 4)


def test_dumper_wraps_the_loss_on_dump_steps_only(tmp_path):
    logp, old, adv, mask = _loss_inputs(b=4, t=16)
    calls = []
    dumper = TokenDumper(str(tmp_path), every=2)
    fn = dumper.wrap(lambda lp, batch: calls.append(lp.shape) or 0.0)
    batch = {"old_log_probs": old, "advantages": adv, "response_mask": mask}
    for step in (1, 2):
        dumper.begin(step)
        fn(logp[:2], {k: v[:2] for k, v in batch.items()})
        fn(logp[2:, :10], {k: v[2:, :10] for k, v in batch.items()})  # narrower micro-batch
        out = dumper.flush()
        assert (out is None) == (step == 1)
    assert len(calls) == 4
    d = load_token_dumps(str(tmp_path))
    assert int(d["step"]) == 2 and len(d["row_offsets"]) == 5
    assert len(d["log_ratio"]) == int(mask[:2].sum() + mask[2:, :10].sum())


def test_figures_from_a_dump(tmp_path):
    sigma = 0.05
    logp, old, adv, mask = _loss_inputs(sigma=sigma)
    dumper = TokenDumper(str(tmp_path), every=1)
    dumper.begin(1)
    dumper.add(logp, old, adv, mask)
    dumper.flush()
    d = load_token_dumps(str(tmp_path))
    # Independent per-token log ratios: the cumulative one spreads like sigma * sqrt(t).
    from ctpo_megatron.plot import logratio_std_by_position

    pos, std_cum, std_tok, counts = logratio_std_by_position(d, min_count=50)
    assert sqrt_t_fit(pos, std_cum) == pytest.approx(sigma, rel=0.1)
    assert np.median(std_tok) == pytest.approx(sigma, rel=0.1)
    assert sqrt_t_fit([1, 4, 9], [2, 4, 6]) == pytest.approx(2.0)
    # Clip rates on the same ratios, by hand at position 1 (s_1 = delta_1): A>0 rows clip
    # above the bound, A<0 rows below it.
    clip = ClipSettings(eps_low=0.2, eps_high=0.2, la_low=0.025, la_high=0.05, la_power=0.5)
    rates = clip_rates_by_position(d, clip, min_count=1)
    first = d["position"] == 1
    x, a = d["cum_log_ratio"][first].astype(np.float64), d["advantage"][first]
    assert rates["position"][0] == 1
    assert rates["la"][0] == pytest.approx(np.mean(((a > 0) & (x > 0.05)) | ((a < 0) & (x < -0.025))))
    assert rates["fixed"][0] == pytest.approx(np.mean(((a > 0) & (x > np.log(1.2))) | ((a < 0) & (x < np.log(0.8)))))
    assert rates["la_dual"][0] == pytest.approx(np.mean((a < 0) & (x > 0.05)))
    # Far out the fixed clip catches the sqrt(t) drift, the sqrt(t)-scaled LA clip much less.
    late = rates["position"] >= 40
    assert rates["fixed"][late].mean() > rates["la"][late].mean()
    pngs = plot_dumps(str(tmp_path), str(tmp_path), clip=clip, min_count=20)
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
