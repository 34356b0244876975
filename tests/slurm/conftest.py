"""Fixtures of the Slurm launcher tests: a real local Slurm cluster and a tiny checkpoint."""

from __future__ import annotations

import os

import pytest

from tests._require import missing_system
from tests.slurm.local_slurm import LocalSlurm, missing_binaries

NODES = 4  # 2 training nodes + 2 rollout nodes


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Slurm daemons with NODES fake nodes (2 fake GPUs, 2 CPUs, its own network namespace and host
    name each); torn down after the session.

    Skips only when the Slurm binaries are missing (scripts/setup_system.sh installs them).
    """
    missing = missing_binaries()
    if missing:
        missing_system(f"Slurm binaries missing: {', '.join(missing)} (run scripts/setup_system.sh as root)")
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=NODES, cpus=2, gpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        killed = cluster.stop()
    assert not cluster.processes_of_cluster(), "processes of the test Slurm cluster survived teardown"
    assert not killed, f"job processes {killed} outlived their Slurm job and had to be killed"


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> dict[str, str]:
    """The tiny run's inputs (HF checkpoint + tokenizer, train/val parquet), no warm start.

    Returns {"model", "train", "val"} paths.
    """
    from ctpo_megatron.data.tiny_setup import TinySetupConfig, prepare_tiny_run
    from ctpo_megatron.data.warm_start import WarmStartConfig

    out = str(tmp_path_factory.mktemp("tiny_inputs"))
    return prepare_tiny_run(out, TinySetupConfig(warm_start=WarmStartConfig(steps=0)))
