"""segmented_cumsum and the scan op: values, gradients, long-sequence accuracy, errors, opcheck.

The oracle is `torch.cumsum` on each sequence in float64 (built here per row / per span, not
with the ops' own reference code, which is itself checked against it).
"""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron.ops import extension_backends, reference, segmented_cumsum
from ctpo_megatron.ops.scan import segment_boundary

pytestmark = pytest.mark.csrc  # tests/conftest.py: a failure in CI without the extension, a skip elsewhere
op = torch.ops.ctpo_megatron.segmented_scan if "cpu" in extension_backends() else None  # loads _C


def ragged(seed: int, lengths: list[int], dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    values = torch.randn(total, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.rand(total, generator=g) > 0.3).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return values, mask, cu


def oracle(values, mask, cu, carry=None, reverse=False):
    """Per-span float64 torch.cumsum (flip for reverse); tokens past cu[-1] are 0."""
    x, m = values.double(), mask.double()
    cum, count = torch.zeros_like(x), torch.zeros_like(x)
    for i, (b, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seg_x, seg_m = x[b:e] * m[b:e], m[b:e]
        if reverse:
            seg_x, seg_m = seg_x.flip(0), seg_m.flip(0)
        c, n = seg_x.cumsum(0), seg_m.cumsum(0)
        if reverse:
            c, n = c.flip(0), n.flip(0)
        cum[b:e] = c + (0 if carry is None else carry[i].double())
        count[b:e] = n
    return cum, count


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_padded_rows_match_cumsum(dtype, tol):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 37, generator=g, dtype=dtype)
    mask = torch.rand(4, 37, generator=g) > 0.4
    mask[2] = False  # an all-masked sequence
    cum, count = segmented_cumsum(values, mask)
    assert cum.dtype == dtype and count.dtype == dtype
    ref = (values.double() * mask).cumsum(-1)
    torch.testing.assert_close(cum.double(), ref, rtol=0, atol=tol)  # float64 accumulation
    assert torch.equal(count, mask.to(dtype).cumsum(-1))
    assert torch.equal(cum[2], torch.zeros(37, dtype=dtype))


def test_packed_with_empty_sequences_tail_padding_and_carry():
    values, mask, cu = ragged(2, [5, 0, 17, 1, 0, 9])
    values = torch.cat([values, torch.full((4,), float("nan"), dtype=values.dtype)])  # tail padding
    mask = torch.cat([mask, torch.ones(4, dtype=mask.dtype)])
    carry = torch.randn(6, dtype=torch.float64)
    cum, count = segmented_cumsum(values, mask, cu, carry)
    ref_cum, ref_count = oracle(values, mask, cu, carry)
    torch.testing.assert_close(cum, ref_cum, rtol=0, atol=1e-12)  # float64 both sides
    assert torch.equal(count, ref_count)
    assert torch.equal(cum[-4:], torch.zeros(4, dtype=torch.float64))  # no segment: 0, not NaN


@pytest.mark.parametrize("reverse", [False, True])
def test_op_forward_and_reverse_match_oracle_and_torch_fallback(reverse):
    values, mask, cu = ragged(3, [7, 3, 0, 12])
    carry_sum, carry_count = torch.randn(4, dtype=torch.float64), torch.arange(4, dtype=torch.float64)
    cum, count = op(values, mask, cu, carry_sum, carry_count, reverse)
    ref_cum, ref_count = oracle(values, mask, cu, carry_sum, reverse)
    torch.testing.assert_close(cum, ref_cum, rtol=0, atol=1e-12)
    torch.testing.assert_close(count, ref_count + torch.repeat_interleave(carry_count, cu.diff().long()))
    fb_cum, fb_count = reference.segmented_scan(values, mask, cu, carry_sum, carry_count, reverse)
    torch.testing.assert_close(fb_cum, cum, rtol=0, atol=1e-12)
    torch.testing.assert_close(fb_count, count, rtol=0, atol=0)


def test_gradients_reach_values_and_carry():
    values, mask, cu = ragged(4, [6, 0, 11, 4])
    values.requires_grad_(True)
    carry = torch.randn(4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(values)
    cum, _ = segmented_cumsum(values, mask, cu, carry)
    got = torch.autograd.grad((cum * upstream).sum(), [values, carry])
    ref_cum, _ = reference.segmented_scan(values, mask, cu, carry)  # plain torch autograd
    want = torch.autograd.grad((ref_cum * upstream).sum(), [values, carry])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # d cum_t / d v_s = m_s for s <= t: the masked suffix sum of the upstream gradient.
    b, e = int(cu[2]), int(cu[3])
    suffix = upstream[b:e].flip(0).cumsum(0).flip(0)
    torch.testing.assert_close(got[0][b:e], suffix * mask[b:e], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1][1], torch.tensor(0.0, dtype=torch.float64))  # empty sequence


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_131072_token_sequence_within_1e5_of_float64(threads, dtype):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2 threads take the blocked two-pass path
    try:
        g = torch.Generator().manual_seed(5)
        values = (0.1 * torch.randn(1, 131072, generator=g)).to(dtype)
        mask = torch.rand(1, 131072, generator=g) > 0.1
        cum, count = segmented_cumsum(values, mask)
    finally:
        torch.set_num_threads(previous)
    assert cum.dtype == torch.float32  # 16-bit inputs accumulate and return float32
    ref = (values.double() * mask).cumsum(-1)
    err = (cum.double() - ref).abs().max().item()
    # A sequential float32 running sum misses by 1.3e-4 on this input; the kernel (float64
    # accumulation, rounded once to float32) gets ~2e-6: 1e-5 is a 5x margin that still fails
    # a float32 accumulator by an order of magnitude.
    assert err < 1e-5, f"max abs error {err:.2e}"
    assert torch.equal(count[0, -1], mask.sum().float())


def test_blocked_parallel_path_equals_serial_path():
    values, mask, cu = ragged(6, [40000, 3, 25000])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = segmented_cumsum(values, mask, cu)
        torch.set_num_threads(2)
        blocked = segmented_cumsum(values, mask, cu)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(blocked[0], serial[0], rtol=0, atol=1e-11)  # float64, other sum order
    assert torch.equal(blocked[1], serial[1])


def test_segment_boundary_values():
    scan = torch.arange(1.0, 8.0)
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    assert segment_boundary(scan, cu, at_end=False).tolist() == [1.0, 0.0, 3.0]
    assert segment_boundary(scan, cu, at_end=True).tolist() == [2.0, 0.0, 7.0]


def test_bad_inputs_name_the_argument():
    values, mask, cu = ragged(7, [3, 4])
    with pytest.raises(ValueError, match="mask has shape"):
        segmented_cumsum(values, mask[:-1], cu)
    with pytest.raises(ValueError, match="carry has shape"):
        segmented_cumsum(values, mask, cu, torch.zeros(3))
    with pytest.raises(ValueError, match="packed values"):
        segmented_cumsum(values.view(1, -1), mask.view(1, -1), cu)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        segmented_cumsum(values, mask, torch.tensor([0, 5, 4, 7], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="exceeds the 7 packed tokens"):
        segmented_cumsum(values, mask, torch.tensor([0, 5, 9], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens\[0\] must be 0"):
        segmented_cumsum(values, mask, torch.tensor([1, 5, 7], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="carry_sum must have shape"):
        op(values, mask, cu, torch.zeros(5, dtype=torch.float64), None, False)


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    values, mask, cu = ragged(8, [5, 0, 9])
    if packed:
        carry = torch.randn(3, dtype=torch.float64, requires_grad=True)
        args = (values.requires_grad_(True), mask, cu, carry, None, False)
    else:
        args = (values[:12].view(3, 4).requires_grad_(True), None, None, None, torch.ones(3, dtype=torch.float64),
                True)
    torch.library.opcheck(op, args)
