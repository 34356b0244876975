import os
import subprocess
import sys

import pytest

from tests._run_once import built_once
from tests.e2e._launch import ROOT, SETUP_S


@pytest.fixture(scope="session")
def cold_tiny_inputs(tmp_path_factory) -> dict[str, str]:
    """The tiny model, tokenizer and data without a warm start (every reward 0 at first, so
    advantages and gradients are 0 and the weights stay put): paths by name."""
    from ctpo_megatron.data.tiny_setup import TinySetupConfig, prepare_tiny_run
    from ctpo_megatron.data.warm_start import WarmStartConfig

    return prepare_tiny_run(str(tmp_path_factory.mktemp("tiny_cold")),
                            TinySetupConfig(warm_start=WarmStartConfig(steps=0)))


@pytest.fixture(scope="session")
def tiny_init(pytestconfig, tmp_path_factory) -> str:
    """What `launch/ctpo_tiny.sh` builds before training (`ctpo_megatron.data.tiny_setup`: the
    warm-started tiny model, its tokenizer and data): its folder, built once per test run."""
    def build(path) -> None:
        subprocess.run([sys.executable, "-m", "ctpo_megatron.data.tiny_setup", str(path / "init")], cwd=ROOT,
                       check=True, timeout=SETUP_S, env={**os.environ, "OMP_NUM_THREADS": "1"})

    return str(built_once(pytestconfig, tmp_path_factory, "tiny_init", build) / "init")
