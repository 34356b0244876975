"""Score responses with a Hugging Face model on megatron-core: per-token log-probs.

    torchrun --nproc-per-node N -m ctpo_megatron.logprobs --hf-model DIR \\
        --input IN.jsonl --output OUT.jsonl --tp T --pp P --cp C [--temperature 1.0] [--micro-batch-size 4]

Each input line is {"prompt_ids": [...], "response_ids": [...]} (other keys are kept); each
output line adds "log_probs": one float per response token, in order. N must be a multiple of
T x P x C; the remaining factor is data parallelism (lines are split over DP replicas). With
C > 1 (context parallelism) every sequence is cut into 2*C zigzag chunks over C ranks. Runs in CPU
mode (gloo) when no GPU is present (see CTPO_CPU_MODE).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch.distributed as dist

logger = logging.getLogger("ctpo_megatron.logprobs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctpo_megatron.logprobs",
        description=__doc__.split("\n\n")[0] + " Launch with torchrun, one process per rank.",
        epilog="Example: torchrun --nproc-per-node 4 -m ctpo_megatron.logprobs --hf-model ckpt "
               "--input in.jsonl --output out.jsonl --tp 2 --pp 2 (--cp 2 splits long sequences too)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--input", required=True, help='JSONL, one {"prompt_ids": [...], "response_ids": [...]} per line')
    parser.add_argument("--output", required=True, help='JSONL written by rank 0: each input line plus "log_probs"')
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size (each sequence split into 2*cp zigzag chunks)")
    parser.add_argument("--temperature", type=float, default=1.0, help="score softmax(logits / temperature)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward micro-batch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model parameter dtype")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk in the vocab-parallel log-prob kernel")
    parser.add_argument("--with-entropy", action="store_true", help='also write "entropy" per response token')
    parser.add_argument("--allow-local-spec", action="store_true",
                        help="on a GPU without TransformerEngine, run megatron's local spec (unfused "
                             "attention, a full [S, S] score matrix per layer) instead of refusing")
    return parser.parse_args(argv)


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            for key in ("prompt_ids", "response_ids"):
                if not isinstance(record.get(key), list):
                    raise ValueError(f"{path}:{lineno}: {key!r} must be a list of token ids")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.logging_utils import init_logging
    from ctpo_megatron.parallel import ParallelDims, destroy_parallel, init_distributed

    rank, world_size = init_distributed()
    init_logging(rank)
    try:
        records = _read_jsonl(args.input)
        cfg = ActorConfig(hf_model_dir=args.hf_model, dims=ParallelDims(tp=args.tp, pp=args.pp, cp=args.cp),
                          params_dtype=args.dtype, temperature=args.temperature,
                          micro_batch_size=args.micro_batch_size, logprob_chunk_size=args.chunk_size,
                          lr=0.0, allow_local_spec=args.allow_local_spec)
        actor = PolicyActor(cfg)
        dp, dp_rank = actor.pgs.dp.size(), actor.pgs.dp.rank()
        # Contiguous shares, so gathering in DP order restores the input order.
        bounds = [len(records) * i // dp for i in range(dp + 1)]
        share = records[bounds[dp_rank]: bounds[dp_rank + 1]]
        scored = actor.compute_log_probs(share, with_entropy=args.with_entropy) if share else []
        log_probs, entropies = scored if args.with_entropy else (scored, None)
        mine = [(lp.tolist(), None if entropies is None else entropies[i].tolist())
                for i, lp in enumerate(log_probs)]
        gathered = [None] * world_size if rank == 0 else None
        first = actor.pgs.tp.rank() == 0 and actor.pgs.pp.rank() == 0 and actor.pgs.cp.rank() == 0
        dist.gather_object(mine if first else None, gathered, dst=0)
        if rank == 0:
            by_replica = [g for g in gathered if g is not None]
            results = [item for replica in by_replica for item in replica]
            assert len(results) == len(records), (len(results), len(records))
            with open(args.output, "w") as f:
                for record, (lp, ent) in zip(records, results):
                    out = dict(record, log_probs=lp)
                    if ent is not None:
                        out["entropy"] = ent
                    f.write(json.dumps(out) + "\n")
            logger.info("wrote %d records to %s", len(records), args.output)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
