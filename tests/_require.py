"""A missing prerequisite skips a test on a developer's machine and fails it in CI, where the
project's scripts installed it: a silent skip there would drop coverage unseen.

- `missing_system`: root, iproute2, Slurm (scripts/setup_system.sh), under CTPO_REQUIRE_SYSTEM=1;
- `missing_build_tool`: the compilers the extension is built and checked with (GCC, nvcc from
  scripts/setup_nvcc.sh), under CTPO_REQUIRE_EXT=1.
scripts/test.sh sets both."""

import os

import pytest

REQUIRE_SYSTEM_ENV = "CTPO_REQUIRE_SYSTEM"
REQUIRE_EXT_ENV = "CTPO_REQUIRE_EXT"


def _missing(env: str, reason: str) -> None:
    if os.environ.get(env) == "1":
        pytest.fail(f"{env}=1 and {reason}", pytrace=False)
    pytest.skip(f"{reason} (set {env}=1 to make this an error)")


def missing_system(reason: str) -> None:
    """Skips (or, under CTPO_REQUIRE_SYSTEM=1, fails) the calling test with `reason`."""
    _missing(REQUIRE_SYSTEM_ENV, reason)


def missing_build_tool(reason: str) -> None:
    """Skips (or, under CTPO_REQUIRE_EXT=1, fails) the calling test with `reason`."""
    _missing(REQUIRE_EXT_ENV, reason)
