"""A missing system prerequisite (root, iproute2, Slurm) skips a test on a developer's machine
and fails it under CTPO_REQUIRE_SYSTEM=1 (set by scripts/test.sh, i.e. CI), where
scripts/setup_system.sh installed them: a silent skip there would drop coverage unseen."""

import os

import pytest

REQUIRE_SYSTEM_ENV = "CTPO_REQUIRE_SYSTEM"


def missing_system(reason: str) -> None:
    """Skips (or, under CTPO_REQUIRE_SYSTEM=1, fails) the calling test with `reason`."""
    if os.environ.get(REQUIRE_SYSTEM_ENV) == "1":
        pytest.fail(f"{REQUIRE_SYSTEM_ENV}=1 and {reason}", pytrace=False)
    pytest.skip(f"{reason} (set {REQUIRE_SYSTEM_ENV}=1 to make this an error)")
