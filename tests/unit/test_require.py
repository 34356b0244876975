"""`tests._require.missing_system` / `missing_build_tool`: a skip on a developer's machine, a
failure under CTPO_REQUIRE_SYSTEM=1 / CTPO_REQUIRE_EXT=1 (what scripts/test.sh, i.e. CI, sets)."""

import pytest

from tests._require import REQUIRE_EXT_ENV, REQUIRE_SYSTEM_ENV, missing_build_tool, missing_system

HELPERS = [(missing_system, REQUIRE_SYSTEM_ENV, REQUIRE_EXT_ENV, "no slurmctld"),
           (missing_build_tool, REQUIRE_EXT_ENV, REQUIRE_SYSTEM_ENV, "no nvcc")]


@pytest.mark.parametrize("helper,env,other_env,reason", HELPERS, ids=["system", "build-tool"])
def test_a_missing_prerequisite_skips_without_the_requirement(monkeypatch, helper, env, other_env, reason):
    monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(other_env, "1")  # the other requirement does not count
    with pytest.raises(pytest.skip.Exception, match=rf"{reason} \(set {env}=1"):
        helper(reason)


@pytest.mark.parametrize("helper,env,other_env,reason", HELPERS, ids=["system", "build-tool"])
def test_a_missing_prerequisite_fails_when_required(monkeypatch, helper, env, other_env, reason):
    monkeypatch.setenv(env, "1")
    with pytest.raises(pytest.fail.Exception, match=rf"{env}=1 and {reason}"):
        helper(reason)
