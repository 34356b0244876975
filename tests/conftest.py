import os

# Tests run on CPU with small thread counts: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Tests marked `csrc` exercise the compiled extension's kernels. Without the extension they
# would silently test nothing, so: CTPO_REQUIRE_EXT=1 (set by scripts/test.sh, i.e. CI) turns a
# missing or broken `ctpo_megatron._C` into a failure of each such test; otherwise they are
# skipped and the reason (why the extension did not load) is printed in the summary (-rs).
REQUIRE_EXT_ENV = "CTPO_REQUIRE_EXT"


def extension_problem() -> str | None:
    """None when the csrc CPU kernels are loaded, else why not (from ctpo_megatron.ops)."""
    from ctpo_megatron.ops import backend_report, extension_backends

    if "cpu" in extension_backends():
        return None
    return "; ".join(line for line in backend_report() if line.startswith("extension:"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("csrc") is None:
        return
    import pytest

    problem = extension_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_EXT_ENV) == "1":
        pytest.fail(f"{REQUIRE_EXT_ENV}=1 and the csrc extension is required: {problem}", pytrace=False)
    pytest.skip(f"csrc kernels not tested: {problem} (set {REQUIRE_EXT_ENV}=1 to make this an error)")
