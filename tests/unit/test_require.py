"""`tests._require.missing_system`: a skip on a developer's machine, a failure under
CTPO_REQUIRE_SYSTEM=1 (what scripts/test.sh, i.e. CI, sets)."""

import pytest

from tests._require import REQUIRE_SYSTEM_ENV, missing_system


def test_missing_system_skips_without_the_requirement(monkeypatch):
    monkeypatch.delenv(REQUIRE_SYSTEM_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no slurmctld \(set CTPO_REQUIRE_SYSTEM=1"):
        missing_system("no slurmctld")


def test_missing_system_fails_when_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_SYSTEM_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"CTPO_REQUIRE_SYSTEM=1 and no slurmctld"):
        missing_system("no slurmctld")
