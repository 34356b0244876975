"""PolicyActor distributed checkpoints: exact resume (optimizer state included), resume onto a
different TP/PP layout, and a save killed midway never damages the last good checkpoint."""

import os

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen2, random_samples

pytestmark = pytest.mark.dist


def _loss(log_probs, batch):
    mask = batch["response_mask"]
    return -(log_probs * mask).sum() / batch["global_num_tokens"] * batch["dp_size"], {}


def _samples():
    samples = random_samples(4, seed=11)
    for s in samples:
        r = len(s["response_ids"])
        s.update(response_mask=[1.0] * r, old_log_probs=[0.0] * r, advantages=[1.0] * r)
    return samples


def _actor(model_dir, tp, pp):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    return PolicyActor(ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, pp=pp),
                                   lr=0.01, adam_eps=1e-3, micro_batch_size=2))


def _weights(actor):
    # numpy arrays pickle by value; torch tensors would cross the result queue as shared-memory
    # handles that die with the rank process.
    return {k: v.numpy().copy() for k, v in actor.iter_hf_weights() if v is not None}


def _save_then_resume(rank, world_size, model_dir, ckpt):
    from ctpo_megatron.actor.checkpoint import read_latest

    out = {}
    actor = _actor(model_dir, 2, 1)  # TP2
    actor.train_step(_samples(), _loss)
    path = actor.save_checkpoint(ckpt, {"step": 1, "note": "after one step"})
    from pathlib import Path

    from ctpo_megatron.actor.checkpoint import files_written_by

    # each rank fsyncs the shard files it wrote (named by its rank), rank 0 also the metadata
    owned = [None, None] if rank == 0 else None
    torch.distributed.gather_object(
        sorted(p.name for p in files_written_by(Path(path), rank) if p.is_file()), owned, dst=0)
    out["own_files"] = owned
    out["w1"] = _weights(actor)
    actor.train_step(_samples(), _loss)
    out["w2"] = _weights(actor)  # what the resumed runs must reproduce
    # A later save that dies midway: its .incomplete directory exists, `latest` is untouched.
    if rank == 0:
        os.makedirs(f"{ckpt}/iter_0000002.incomplete/junk", exist_ok=True)
        with open(f"{ckpt}/iter_0000002.incomplete/junk/half_written", "wb") as f:
            f.write(b"\0" * 100)
    torch.distributed.barrier()
    out["latest"] = read_latest(ckpt).name

    for tp, pp in ((2, 1), (1, 2)):  # same layout, then a different one (PP2)
        resumed = _actor(model_dir, tp, pp)
        extra = resumed.load_checkpoint(ckpt)
        out[f"extra_{tp}{pp}"] = extra
        out[f"step_{tp}{pp}"] = resumed.step_count
        out[f"w1_{tp}{pp}"] = _weights(resumed)
        resumed.train_step(_samples(), _loss)
        out[f"w2_{tp}{pp}"] = _weights(resumed)
    return out if rank == 0 else None


def test_resume_exact_and_across_layouts(tmp_path):
    model_dir = str(build_qwen2(tmp_path / "qwen2"))
    ckpt = str(tmp_path / "ckpt")
    out = run_on_ranks(_save_then_resume, 2, model_dir, ckpt, timeout=400)[0]
    assert out["latest"] == "iter_0000001"
    rank0, rank1 = out["own_files"]
    assert any(n.startswith("__0_") for n in rank0) and "metadata.json" in rank0, rank0
    assert rank1 and all(n.startswith("__1_") and n.endswith(".distcp") for n in rank1), rank1
    assert os.listdir(os.path.join(ckpt, "iter_0000001")) and not set(rank0) & set(rank1)
    for layout in ("21", "12"):
        assert out[f"extra_{layout}"] == {"step": 1, "note": "after one step"}
        assert out[f"step_{layout}"] == 1
        for name, w in out["w1"].items():
            assert (out[f"w1_{layout}"][name] == w).all(), (layout, name)  # weights bit-exact
        for name, w in out["w2"].items():
            # The second step needs Adam's moments from the checkpoint: without them the update
            # would be lr * sign(g)-like and differ by ~lr = 1e-2. Across layouts fp32 sums
            # reorder: ~1e-6.
            torch.testing.assert_close(torch.from_numpy(out[f"w2_{layout}"][name]),
                                       torch.from_numpy(w), rtol=0, atol=5e-6,
                                       msg=f"{layout} {name}")
