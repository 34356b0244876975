"""Context-parallel prefix sum and CTPO loss on real gloo ranks: CP = 2, 3, 4 equal CP = 1.

Every rank builds the same global batch (same seed), computes the unsharded CP = 1 result
itself, takes its zigzag shard, runs the CP path over a dedicated cp_group and reports the
largest deviation from the shard of the CP = 1 result. The batches are ragged: empty and
all-masked sequences, sequences shorter than 2*cp, tool-output spans (mask 0) crossing chunk
boundaries. Everything is float64, so "equal" means within 1e-12 (observed: ~1e-15, a 1000x
margin for summation order; a carry rounded through float32 misses by 1e-7 to 4e-7 and fails).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ctpo_megatron.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.dist


def _padded_batch(cp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, S = 6, 2 * cp * 5
    chunk = S // (2 * cp)
    lp = -torch.rand(B, S, generator=g, dtype=torch.float64)
    olp = lp + 0.05 * torch.randn(B, S, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, S).contiguous()
    lengths = torch.tensor([S, 0, 2 * cp - 1, S - 3, 1, S])  # empty, shorter than 2*cp, ragged
    mask = (torch.arange(S) < lengths[:, None]).double()
    mask[0, chunk - 2: chunk + 3] = 0  # tool output across the chunk 0 | chunk 1 boundary
    mask[3, 3 * chunk - 1: 5 * chunk + 1] = 0  # spans two boundaries (several ranks)
    mask[5] = 0  # all masked, full length
    return lp, olp, adv, mask


def _packed_batch(cp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = [2 * cp * k for k in (3, 0, 1, 4, 2)]  # an empty and a 2*cp-token sequence
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    values = torch.randn(T, generator=g, dtype=torch.float64)
    mask = (torch.rand(T, generator=g) > 0.2).double()
    start = int(cu[3])
    mask[start + lengths[3] // 8 - 1: start + lengths[3] // 2 + 1] = 0  # crosses chunk boundaries
    return values, mask, cu


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _cp_rank_checks(rank: int, world_size: int, seed: int) -> dict[str, float]:
    from ctpo_megatron.algo import PolicyLossConfig, ctpo_log_ratio, policy_loss
    from ctpo_megatron.ops import (context_parallel_cumsum, segmented_cumsum, zigzag_local_cu_seqlens,
                                   zigzag_shard)

    cp = world_size
    group = dist.new_group(list(range(cp)))
    errors: dict[str, float] = {}

    def shard(x, cu=None):
        return zigzag_shard(x, cp, rank, cu_seqlens=cu, seq_dim=0 if cu is not None else -1)

    # Scan and its backward, padded.
    lp, olp, adv, mask = _padded_batch(cp, seed)
    g = torch.Generator().manual_seed(seed + 1)  # identical on every rank
    values = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    upstream = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    full_values = values.clone().requires_grad_(True)
    cum, count = segmented_cumsum(full_values, mask)
    full_grad, = torch.autograd.grad((cum * upstream).sum(), full_values)
    local_values = shard(values).requires_grad_(True)
    local_cum, local_count = context_parallel_cumsum(local_values, shard(mask), group)
    local_grad, = torch.autograd.grad((local_cum * shard(upstream)).sum(), local_values)
    errors["padded_cum"] = _max_err(local_cum, shard(cum.detach()))
    errors["padded_count"] = _max_err(local_count, shard(count))
    errors["padded_grad"] = _max_err(local_grad, shard(full_grad))

    # Scan and its backward, packed (THD).
    pvalues, pmask, cu = _packed_batch(cp, seed + 2)
    pupstream = torch.randn(pvalues.shape, generator=g, dtype=torch.float64)
    full_p = pvalues.clone().requires_grad_(True)
    cum, count = segmented_cumsum(full_p, pmask, cu)
    full_grad, = torch.autograd.grad((cum * pupstream).sum(), full_p)
    local_cu = zigzag_local_cu_seqlens(cu, cp)
    local_p = shard(pvalues, cu).requires_grad_(True)
    local_cum, local_count = context_parallel_cumsum(local_p, shard(pmask, cu), group, cu_seqlens=local_cu)
    local_grad, = torch.autograd.grad((local_cum * shard(pupstream, cu)).sum(), local_p)
    errors["packed_cum"] = _max_err(local_cum, shard(cum.detach(), cu))
    errors["packed_count"] = _max_err(local_count, shard(count, cu))
    errors["packed_grad"] = _max_err(local_grad, shard(full_grad, cu))

    # The CTPO loss (fused kernel via policy_loss) with global prefix sums from the CP scan.
    n_tokens = int((mask > 0).sum())
    for name, cfg in (("cumprod_la", PolicyLossConfig()),
                      ("geomean_la", PolicyLossConfig(variant="geomean")),
                      ("cumprod_plain", PolicyLossConfig(adaptive_clip=False))):
        full_lp = lp.clone().requires_grad_(True)
        loss, _ = policy_loss(full_lp, olp, adv, mask, cfg)
        full_grad, = torch.autograd.grad(loss, full_lp)
        local_lp = shard(lp).requires_grad_(True)
        l_olp, l_adv, l_mask = shard(olp), shard(adv), shard(mask)
        c, n = context_parallel_cumsum(ctpo_log_ratio(local_lp, l_olp, l_mask), l_mask > 0, group)
        local_loss, _ = policy_loss(local_lp, l_olp, l_adv, l_mask, cfg, batch_num_tokens=n_tokens,
                                    cum_log_ratio=c, cum_count=n)
        local_grad, = torch.autograd.grad(local_loss, local_lp)
        total = local_loss.detach().clone()
        dist.all_reduce(total, group=group)
        errors[f"loss_{name}"] = abs(total.item() - loss.item())
        errors[f"grad_{name}"] = _max_err(local_grad, shard(full_grad))

    # The same loss on the packed batch (rows flattened into one [1, T] "row": sums given).
    plp = -pvalues.abs()
    polp = plp + 0.05 * pupstream
    padv = torch.sign(pupstream)
    cfg = PolicyLossConfig()
    ref_cum, ref_n = segmented_cumsum(ctpo_log_ratio(plp, polp, pmask), pmask > 0, cu)
    full_lp = plp.clone().requires_grad_(True)
    loss, _ = policy_loss(full_lp[None], polp[None], padv[None], pmask[None], cfg,
                          cum_log_ratio=ref_cum[None], cum_count=ref_n[None])
    full_grad, = torch.autograd.grad(loss, full_lp)
    local_lp = shard(plp, cu).requires_grad_(True)
    l_olp, l_adv, l_mask = shard(polp, cu), shard(padv, cu), shard(pmask, cu)
    c, n = context_parallel_cumsum(ctpo_log_ratio(local_lp, l_olp, l_mask), l_mask > 0, group, cu_seqlens=local_cu)
    local_loss, _ = policy_loss(local_lp[None], l_olp[None], l_adv[None], l_mask[None], cfg,
                                batch_num_tokens=int((pmask > 0).sum()), cum_log_ratio=c[None], cum_count=n[None])
    local_grad, = torch.autograd.grad(local_loss, local_lp)
    dist.all_reduce(local_loss := local_loss.detach().clone(), group=group)
    errors["packed_loss"] = abs(local_loss.item() - loss.item())
    errors["packed_grad_loss"] = _max_err(local_grad, shard(full_grad, cu))

    # A local shard that cannot hold two equal chunks is rejected before any collective.
    try:
        context_parallel_cumsum(torch.zeros(2, 5, dtype=torch.float64), torch.ones(2, 5), group)
        errors["odd_length_error"] = float("inf")
    except ValueError as exc:
        errors["odd_length_error"] = 0.0 if "must be even" in str(exc) else float("inf")
    return errors


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cp_scan_and_ctpo_loss_equal_cp1(cp):
    results = run_on_ranks(_cp_rank_checks, cp, 11 * cp, timeout=240)
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v <= 1e-12}
        assert not bad, f"cp={cp} rank {rank}: deviations from CP=1 above 1e-12: {bad}"
