"""CLI: `python -m ctpo_megatron.rollout.serving.server --model DIR --port P [options]`."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal

import torch
from aiohttp import web

from ctpo_megatron.logging_utils import init_logging
from ctpo_megatron.rollout.serving.server.app import build_app, make_state
from ctpo_megatron.rollout.serving.server.scheduler import DECODE_DELAY_ENV

logger = logging.getLogger("ctpo_megatron.rollout.serving.server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctpo_megatron.rollout.serving.server",
        description="Embedded inference server: serves SGLang's native HTTP API (token-in/"
                    "token-out /generate, weight updates, control) from a Hugging Face causal LM.")
    parser.add_argument("--model", "--model-path", dest="model", required=True,
                        help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="TCP port (default 30000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed for requests without sampling_seed (default 0)")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="most sequences decoded together in one batch (default 32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype; log-probs are always computed in float32")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--weight-version", default="default", help="initial weight version string")
    parser.add_argument("--tp-size", type=int, default=1,
                        help="weight-update ranks, as an SGLang server of this TP size has: each "
                             "joins the group at rank_offset + tp_rank and decodes its own tensor "
                             "entry (generation runs on one model; default 1)")
    parser.add_argument("--rank-digests", action="store_true",
                        help="each TP rank keeps a sha256 of the weight bytes it received in the "
                             "current update session (/server_info tp_ranks; for tests, costs a pass)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = leave torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_logging(0)
    # `kill -USR2 <pid>` prints every thread's stack to the log (a stuck collective, say).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    if args.max_batch_size < 1:
        raise SystemExit(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.tp_size < 1:
        raise SystemExit(f"--tp-size must be >= 1, got {args.tp_size}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if float(os.environ.get(DECODE_DELAY_ENV, "") or 0) > 0:
        # Simulated-latency mode stands in for GPUs on other nodes: this server's own compute
        # takes only CPU the trainer leaves idle (its TP ranks run in lockstep, so a core taken
        # from one rank stalls all of them). Set before any thread starts: threads inherit it.
        os.nice(19 - os.nice(0))
    state = make_state(model=args.model, seed=args.seed, max_batch_size=args.max_batch_size,
                       dtype=args.dtype, device=args.device, weight_version=args.weight_version,
                       tp_size=args.tp_size, rank_digests=args.rank_digests,
                       host=args.host, port=args.port)
    logger.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # requests (SGLang aborts on disconnect too).
    web.run_app(build_app(state), host=args.host, port=args.port, print=None,
                access_log=None, handle_signals=True, handler_cancellation=True)


if __name__ == "__main__":
    main()
