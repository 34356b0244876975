"""Context parallelism in the actor: activation memory per rank, and the CTPO prefix sum's bytes.

    python benchmarks/bench_cp_actor.py [--seqlen 2048] [--loss-tokens 32768] [--reps 3]

(1) Activation memory. One sequence of --seqlen tokens through `PolicyActor.train_step` (tiny
    Llama: 2 layers, hidden 64, 4 heads / 2 KV groups, vocab 200, megatron's local spec) on 2
    gloo ranks: at CP 2 (each rank holds half of the sequence), then in the same run at CP 1
    (DP 2, each rank the whole sequence). Activation memory = bytes of the distinct tensors
    autograd saves for backward during the step (parameters excluded), per rank; it is
    deterministic, so one step measures it. The step's wall time (median of --reps) is printed
    for information (2 ranks share the CPU).
(2) Bytes exchanged by the CTPO loss's prefix sum at CP 2 for one sequence of --loss-tokens
    response tokens: `context_parallel_policy_loss` forward + backward, counting the bytes every
    all-gather delivers to a rank, vs the baseline of all-gathering the float32 log-ratios of
    the sequence (what sequence-level losses do elsewhere), counted the same way.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctpo_megatron.parallel.spawn import run_on_ranks  # noqa: E402


def _saved_bytes(actor, fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while fn() runs."""
    params = {p.untyped_storage().data_ptr() for chunk in actor.model for p in chunk.parameters()}
    for chunk in actor.model:
        params |= {b.param_data.untyped_storage().data_ptr() for b in getattr(chunk, "buffers", [])
                   if getattr(b, "param_data", None) is not None}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _loss(log_probs, batch):
    from ctpo_megatron.actor.context_parallel import context_parallel_policy_loss
    from ctpo_megatron.algo import PolicyLossConfig

    return context_parallel_policy_loss(log_probs, batch, PolicyLossConfig(name="ctpo"))


def _memory(rank, world_size, model_dir, seqlen, reps):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    prompt = 16
    r = seqlen - prompt
    sample = {"prompt_ids": torch.randint(0, 200, (prompt,), generator=gen).tolist(),
              "response_ids": torch.randint(0, 200, (r,), generator=gen).tolist(),
              "old_log_probs": (-5.3 + 0.1 * torch.randn(r, generator=gen)).tolist(),
              "advantages": [1.0] * r}
    out = {}
    for cp in (2, 1):
        actor = PolicyActor(ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(cp=cp), lr=1e-4,
                                        micro_batch_size=1))
        out[cp] = {"bytes": _saved_bytes(actor, lambda: actor.train_step([sample], _loss))}
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            actor.train_step([sample], _loss)
            times.append(time.perf_counter() - start)
        out[cp]["seconds"] = statistics.median(times)
        del actor
    return out


def _exchange(rank, world_size, tokens):
    """Bytes delivered per rank by the CP loss's all-gathers, forward + backward."""
    from ctpo_megatron.actor.batching import TokenBatch, build_micro_batch
    from ctpo_megatron.actor.policy import PER_TOKEN_FIELDS
    from ctpo_megatron.actor.context_parallel import context_parallel_policy_loss, shard_micro_batch
    from ctpo_megatron.algo import PolicyLossConfig
    from ctpo_megatron.algo.ctpo import ctpo_log_ratio

    cp = world_size
    group = dist.new_group(list(range(cp)))
    gen = torch.Generator().manual_seed(1)
    old = (-2 * torch.rand(tokens, generator=gen)).tolist()
    sample = {"prompt_ids": [1], "response_ids": torch.randint(0, 200, (tokens,), generator=gen).tolist(),
              "old_log_probs": old, "advantages": [1.0] * tokens}
    part = shard_micro_batch(build_micro_batch(TokenBatch.from_samples([sample], PER_TOKEN_FIELDS), seq_multiple=2 * cp), cp, rank)
    log_probs = (part.fields["old_log_probs"] + 0.05 * torch.randn(part.tokens.shape, generator=gen)).requires_grad_()
    batch = dict(part.fields, global_num_tokens=tokens, dp_size=cp, cp_group=group)
    counted = {"bytes": 0}
    real_all_gather = dist.all_gather

    def counting_all_gather(outputs, tensor, *args, **kwargs):
        counted["bytes"] += sum(o.numel() * o.element_size() for o in outputs)
        return real_all_gather(outputs, tensor, *args, **kwargs)

    dist.all_gather = counting_all_gather
    try:
        loss, _ = context_parallel_policy_loss(log_probs, batch, PolicyLossConfig(name="ctpo"))
        loss.backward()
        ours = counted["bytes"]
        counted["bytes"] = 0
        d = ctpo_log_ratio(log_probs, batch["old_log_probs"], batch["response_mask"]).contiguous()
        dist.all_gather([torch.empty_like(d) for _ in range(cp)], d, group=group)
        baseline = counted["bytes"]
    finally:
        dist.all_gather = real_all_gather
    return {"ours": ours, "baseline": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens of the one sequence (memory)")
    parser.add_argument("--loss-tokens", type=int, default=32768, help="response tokens (prefix-sum bytes)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per layout (median)")
    args = parser.parse_args()
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tests._tiny_hf import build_llama

    print(f"python {platform.python_version()}, torch {torch.__version__}, gloo on CPU, 2 ranks")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_llama(Path(tmp) / "llama", num_hidden_layers=2,
                                    max_position_embeddings=max(args.seqlen, 256)))
        mem = run_on_ranks(_memory, 2, model_dir, args.seqlen, args.reps, timeout=1200)
    per_cp = {cp: max(r[cp]["bytes"] for r in mem) for cp in (1, 2)}
    secs = {cp: max(r[cp]["seconds"] for r in mem) for cp in (1, 2)}
    print(f"(1) activation memory, one {args.seqlen}-token sequence, max over ranks:")
    print(f"    cp=1 {per_cp[1] / 2**20:9.1f} MiB   step {secs[1]:.2f} s")
    print(f"    cp=2 {per_cp[2] / 2**20:9.1f} MiB   step {secs[2]:.2f} s")
    print(f"    ratio cp2/cp1 = {per_cp[2] / per_cp[1]:.3f}  (goal <= 0.6)")
    ex = run_on_ranks(_exchange, 2, args.loss_tokens, timeout=600)
    ours, base = max(r["ours"] for r in ex), max(r["baseline"] for r in ex)
    print(f"(2) CTPO prefix sum at cp=2, {args.loss_tokens} tokens, bytes received per rank (fwd+bwd):")
    print(f"    ours {ours:,}  all-gather of log-ratios {base:,}  ratio {ours / base:.2e}  (goal <= 1.00e-03)")


if __name__ == "__main__":
    main()
