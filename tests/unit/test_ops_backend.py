"""Backend selection: `python -m ctpo_megatron.ops` names the active kernels, and a missing
extension degrades to the pure-torch path with one warning and the same results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


@pytest.mark.csrc  # without the extension: a failure in CI, a skip elsewhere (tests/conftest.py)
def test_module_reports_the_active_backend():
    import torch

    out = run_python("-m", "ctpo_megatron.ops")
    assert out.returncode == 0, out.stderr
    assert "cpu: csrc CPU kernels" in out.stdout
    if torch.version.cuda is None:
        assert "CUDA kernels not built: torch was a CPU build at install time" in out.stdout


MISSING_EXTENSION = textwrap.dedent("""
    import logging, sys
    sys.modules["ctpo_megatron._C"] = None  # importing it now raises ImportError
    logging.basicConfig(level=logging.WARNING)
    import torch
    from ctpo_megatron.algo import PolicyLossConfig, ctpo_token_terms, fused_ctpo_token_terms, policy_loss
    from ctpo_megatron.ops import extension_backends, segmented_cumsum
    assert extension_backends() == frozenset()
    from ctpo_megatron.ops import backend_report
    assert "extension: not loaded: extension ctpo_megatron._C not importable" in " ".join(backend_report())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 40, generator=g) > 0.3
    for _ in range(3):
        cum, count = segmented_cumsum(x, m)
    assert torch.allclose(cum, (x * m).cumsum(-1), rtol=0, atol=1e-12)
    cu = torch.tensor([0, 50, 50, 120], dtype=torch.int32)
    cum, _ = segmented_cumsum(x.reshape(-1), m.reshape(-1), cu)
    assert torch.allclose(cum[50:120], (x * m).reshape(-1)[50:120].cumsum(0), atol=1e-12)
    lp, olp = -x.detach().abs(), -x.detach().abs() + 0.01
    adv, mask = torch.ones_like(lp), m.double()
    terms = fused_ctpo_token_terms(lp, olp, adv, mask, PolicyLossConfig())
    ref = ctpo_token_terms(lp, olp, adv, mask, PolicyLossConfig())
    assert torch.equal(terms.pg_losses, ref.pg_losses)
    loss, _ = policy_loss(lp, olp, adv, mask, PolicyLossConfig())
    assert torch.isfinite(loss)
    print("OK")
""")


def test_missing_extension_falls_back_with_one_warning():
    out = run_python("-c", MISSING_EXTENSION)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
    warnings = [line for line in out.stderr.splitlines() if "using the pure-torch path" in line]
    assert len(warnings) == 1, out.stderr
    assert "not importable" in warnings[0]


def test_ops_never_imports_algo():
    """One direction only: algo uses ops' kernels; ops is a leaf."""
    out = run_python("-c", "import sys, ctpo_megatron.ops; "
                           "print(sorted(m for m in sys.modules if m.startswith('ctpo_megatron.algo')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
