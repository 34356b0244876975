"""The per-token CTPO math (csrc/include/ctpo/ctpo_math.h) vectorizes on CPU, for every kernel
variant (LA or plain clipping, cumprod or geomean, the dual bound shared with the high one or
not): a loop shaped like the loss kernel's `eval_tile` is compiled for AVX2 with the
extension's vectorization flags (setup.py), and GCC's report must say it vectorized. A silent
fall back to scalar code left the plain-clip kernel 2.7x slower for several sessions, and no
result changes when that happens, so only the compiler's report can tell.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess

import pytest

from tests._require import missing_build_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The loop of `eval_tile` (csrc/cpu/ctpo_loss.cpp) for float inputs, one variant per build.
PROBE = r"""
#include <cstdint>
#include "ctpo/ctpo_math.h"
#include "ctpo/fast_exp.h"
using namespace ctpo;
void probe(int64_t n, const float* __restrict__ cum, const float* __restrict__ count,
           const float* __restrict__ scale, const float* __restrict__ lp, const float* __restrict__ adv,
           const float* __restrict__ m, float* __restrict__ loss, float* __restrict__ grad,
           float* __restrict__ ratio, bool* __restrict__ high, bool* __restrict__ low, bool* __restrict__ dual,
           bool* __restrict__ clipped, const CtpoParams& params) {
  CtpoParams p = params;
  p.adaptive = ADAPTIVE;
  p.geomean = GEOMEAN;
  p.dual_is_high = DUAL_IS_HIGH;
  const FastExp exp_fn;
#pragma GCC ivdep
  for (int64_t k = 0; k < n; ++k) {  // THE LOOP
    const bool valid = m[k] > 0.0f;
    const TokenTerms<float> tt = ctpo_token<float>(cum[k], count[k], lp[k], adv[k], scale[k], p, exp_fn);
    loss[k] = valid ? tt.loss : 0.0f;
    grad[k] = valid ? tt.grad : 0.0f;
    ratio[k] = valid ? tt.ratio : 0.0f;
    high[k] = valid & (tt.high != 0);
    low[k] = valid & (tt.low != 0);
    dual[k] = valid & (tt.dual != 0);
    clipped[k] = valid & (tt.clipped != 0);
  }
}
"""
# setup.py's flags that let the compiler if-convert the loop's float selects.
VECTORIZE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "--param=max-tree-if-conversion-phi-args=32"]


@functools.lru_cache(maxsize=1)
def gcc_12_or_later() -> str | None:
    """The C++ compiler when it is GCC >= 12 targeting x86-64 (what the extension's CPU clones
    are built with here and in CI)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None or platform.machine() != "x86_64":
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    major = subprocess.run([compiler, "-dumpfullversion"], capture_output=True, text=True).stdout.split(".")[0]
    return compiler if "clang" not in version.lower() and major.isdigit() and int(major) >= 12 else None


@pytest.mark.parametrize("dual_is_high", [False, True], ids=["dual-c", "dual-high"])
@pytest.mark.parametrize("geomean", [False, True], ids=["cumprod", "geomean"])
@pytest.mark.parametrize("adaptive", [True, False], ids=["la-clip", "plain-clip"])
def test_the_per_token_loss_loop_vectorizes(tmp_path, adaptive, geomean, dual_is_high):
    compiler = gcc_12_or_later()
    if compiler is None:
        missing_build_tool("no GCC >= 12 for x86-64, the compiler the extension's CPU loops are tuned for")
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE)
    loop_line = next(i for i, line in enumerate(PROBE.splitlines(), 1) if "THE LOOP" in line)
    variant = [f"-DADAPTIVE={int(adaptive)}", f"-DGEOMEAN={int(geomean)}", f"-DDUAL_IS_HIGH={int(dual_is_high)}"]
    out = subprocess.run([compiler, *VECTORIZE_FLAGS, "-std=c++20", "-mavx2", *variant,
                          f"-I{os.path.join(ROOT, 'csrc', 'include')}", "-c", str(source),
                          "-o", str(tmp_path / "probe.o"), "-fopt-info-vec-optimized"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    vectorized = re.findall(rf"probe\.cpp:{loop_line}:\d+: optimized: loop vectorized", out.stderr)
    assert vectorized, f"the loop at probe.cpp:{loop_line} did not vectorize:\n{out.stderr[-3000:]}"
