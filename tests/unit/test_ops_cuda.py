"""CUDA kernels against the CPU kernels (run where a GPU is present; skipped elsewhere).

The CPU kernels are checked against torch oracles in test_ops_scan.py / test_ops_ctpo_loss.py;
here the same inputs run on both devices, values and gradients, plus opcheck on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron.algo import PolicyLossConfig
from ctpo_megatron.algo import fused_ctpo_token_terms
from ctpo_megatron.ops import extension_backends, segmented_cumsum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in extension_backends(),
                       reason="needs a GPU and the extension built with CUDA"),
]


def ragged(seed=0, lengths=(5, 0, 3000, 1, 9000), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    values = torch.randn(total + 7, generator=g, dtype=torch.float64).to(dtype)  # 7 tail tokens
    mask = (torch.rand(total + 7, generator=g) > 0.3).to(dtype)
    return values, mask, cu


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_scan_cuda_equals_cpu(dtype, tol):
    values, mask, cu = ragged(dtype=dtype)
    carry = torch.randn(cu.numel() - 1, dtype=torch.float64)
    cpu = segmented_cumsum(values, mask, cu, carry)
    gpu = segmented_cumsum(values.cuda(), mask.cuda(), cu.cuda(), carry.cuda())
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol)  # both accumulate in float64
    rows = values[:12000].reshape(4, 3000).requires_grad_(True)
    up = torch.randn(4, 3000, dtype=torch.float64).to(dtype)
    g_cpu, = torch.autograd.grad((segmented_cumsum(rows, mask[:12000].reshape(4, 3000))[0] * up).sum(), rows)
    rows_gpu = rows.detach().cuda().requires_grad_(True)
    g_gpu, = torch.autograd.grad(
        (segmented_cumsum(rows_gpu, mask[:12000].reshape(4, 3000).cuda())[0] * up.cuda()).sum(), rows_gpu)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", [PolicyLossConfig(), PolicyLossConfig(variant="geomean", adaptive_clip=False)])
def test_fused_loss_cuda_equals_cpu(cfg):
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(8, 2048, generator=g, dtype=torch.float64)
    olp = lp + 0.05 * torch.randn(8, 2048, generator=g, dtype=torch.float64)
    adv = torch.randn(8, 1, generator=g, dtype=torch.float64).expand(8, 2048).contiguous()
    mask = (torch.rand(8, 2048, generator=g) > 0.2).double()
    lp.requires_grad_(True)
    cpu = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    g_cpu, = torch.autograd.grad(cpu.pg_losses.sum(), lp)
    lp_gpu = lp.detach().cuda().requires_grad_(True)
    gpu = fused_ctpo_token_terms(lp_gpu, olp.cuda(), adv.cuda(), mask.cuda(), cfg)
    g_gpu, = torch.autograd.grad(gpu.pg_losses.sum(), lp_gpu)
    for name in ("pg_losses", "ratio", "log_ratio_clamped", "clip_high", "clip_low", "clip_dual", "clipped"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-12, atol=1e-12)


def test_opcheck_cuda():
    values, mask, cu = ragged(lengths=(5, 0, 40))
    torch.library.opcheck(torch.ops.ctpo_megatron.segmented_scan,
                          (values.cuda().requires_grad_(True), mask.cuda(), cu.cuda(), None, None, False))
    lp = -torch.rand(3, 20, dtype=torch.float64, device="cuda").requires_grad_(True)
    olp, adv = lp.detach() + 0.1, torch.ones(3, 20, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.ctpo_megatron.ctpo_token_loss,
                          (lp, olp, adv, torch.ones_like(adv), None, None, None, False, True, 0.025, 0.05, 0.05, 0.5))
