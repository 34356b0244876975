"""Fixtures of the Slurm launcher tests: a real local Slurm cluster and a tiny checkpoint."""

from __future__ import annotations

import os

import pytest

from tests.slurm.local_slurm import LocalSlurm, missing_binaries

NODES = 3  # 2 training nodes + 1 rollout node


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Slurm daemons with NODES fake nodes (1 fake GPU, 2 CPUs each); torn down after the session.

    Skips only when the Slurm binaries are missing (scripts/setup_system.sh installs them).
    """
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm binaries missing: {', '.join(missing)} (run scripts/setup_system.sh as root)")
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=NODES, cpus=2, gpus=1)
    try:
        cluster.start()
        yield cluster
    finally:
        killed = cluster.stop()
    assert not cluster.processes_of_cluster(), "processes of the test Slurm cluster survived teardown"
    assert not killed, f"job processes {killed} outlived their Slurm job and had to be killed"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A random tiny Qwen2-style HF checkpoint (model + char tokenizer) the rollout server loads."""
    from ctpo_megatron.data.tiny_model import TinyModelConfig, build_tiny_model, save_tiny_model
    from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer

    out = str(tmp_path_factory.mktemp("tiny_ckpt"))
    tokenizer = build_char_tokenizer(out)
    model = build_tiny_model(TinyModelConfig(), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return save_tiny_model(model, tokenizer, out)
