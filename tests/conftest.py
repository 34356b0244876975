import os

# Tests run on CPU with small thread counts: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Tests marked `csrc` exercise the compiled extension's kernels. Without the extension they
# would silently test nothing, so: CTPO_REQUIRE_EXT=1 (set by scripts/test.sh, i.e. CI) turns a
# missing or broken `ctpo_megatron._C` into a failure of each such test; otherwise they are
# skipped and the reason (why the extension did not load) is printed in the summary (-rs).
from tests._require import REQUIRE_EXT_ENV  # noqa: E402  (after the environment defaults above)


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


# Random test order, to catch tests that depend on what ran before them: `--shuffle SEED` (or
# CTPO_TEST_SHUFFLE=SEED; "random" draws a seed) shuffles the modules, then the tests inside
# each module (module-scoped fixtures stay shared); the longest modules always go first
# (tests/_order.py). The seed is printed at the end: rerun with it to get the same order.
# scripts/test.sh shuffles by default.
SHUFFLE_ENV = "CTPO_TEST_SHUFFLE"
DRAWN_SEED_ENV = "CTPO_TEST_SHUFFLE_DRAWN"


def pytest_addoption(parser):
    parser.addoption("--shuffle", metavar="SEED", default=None,
                     help=f"run the tests in a random order from SEED ('random': draw one; also ${SHUFFLE_ENV})")


def pytest_configure(config):
    import random

    seed = config.getoption("--shuffle") or os.environ.get(SHUFFLE_ENV)
    if seed == "random":
        # xdist's workers parse the same arguments again but inherit the environment, which this
        # hook sets before they start: the seed is drawn once, and every worker collects the
        # same order.
        seed = os.environ.get(DRAWN_SEED_ENV) or str(random.SystemRandom().randrange(10**6))
        os.environ[DRAWN_SEED_ENV] = seed
    config.ctpo_shuffle_seed = seed or None


def pytest_collection_modifyitems(config, items):
    from tests._order import ROOT, ordered_items

    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(os.path.relpath(str(item.path), ROOT), []).append(item)
    items[:] = ordered_items(modules, config.ctpo_shuffle_seed)


def pytest_terminal_summary(terminalreporter, config):
    seed = getattr(config, "ctpo_shuffle_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"test order shuffled: rerun it with --shuffle {seed}")
