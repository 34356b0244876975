"""Running padded micro-batches through megatron's forward/backward schedules.

`run_schedule` drives `get_forward_backward_func()` (no pipelining, or 1F1B for PP > 1) over a
list of micro-batches (`make_micro_batches` slices a `TokenBatch` into fixed-size ones,
`budget_micro_batches` into token-budget ones, padded or packed): runs GPTModel, and on the last PP stage turns
the vocab-parallel logits into per-response-token log-probs (vocab_parallel.py) that a callback
consumes. It knows nothing about losses or optimizers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ctpo_megatron.actor.batching import MicroBatch, TokenBatch, build_micro_batch
from ctpo_megatron.actor.packing import PackedMicroBatch, build_packed_micro_batch, packed_attention_inputs
from ctpo_megatron.actor.token_budget import filler_batch, plan_token_budget
from ctpo_megatron.actor.vocab_parallel import vocab_parallel_log_probs
from ctpo_megatron.parallel.cpu_mode import is_cpu_mode


@dataclass
class ScoreSettings:
    """How logits become log-probs."""

    vocab_size: int
    """True vocabulary size (entries past it in the padded vocabulary are masked)."""
    temperature: float
    """logits / temperature before the softmax."""
    chunk_size: int
    """Tokens per chunk in the vocab-parallel kernel."""
    with_entropy: bool = False
    """Also compute per-token entropy."""


def model_device() -> torch.device:
    """The device megatron runs on: the current CUDA device, or CPU in CPU mode."""
    if is_cpu_mode() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def pinned_copies(device: torch.device) -> bool:
    """Whether host-to-device copies go through pinned memory with non_blocking=True: only
    to a CUDA device (a pageable or blocking copy there waits for the stream); never on CPU,
    where nothing is copied."""
    return device.type == "cuda"


def micro_batch_to(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """`mb` with every tensor (and every `fields` entry) on `device`: pinned, then copied with
    non_blocking=True when `pinned_copies(device)`; `mb` itself when nothing is elsewhere (CPU
    mode). The pinned host tensors stay alive until their copies ran (torch's pinned-memory
    allocator records the copy's stream)."""
    pinned = pinned_copies(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        return (t.pin_memory() if pinned and t.device.type == "cpu" else t).to(device, non_blocking=pinned)

    tensors = {f.name: getattr(mb, f.name) for f in dataclasses.fields(mb) if torch.is_tensor(getattr(mb, f.name))}
    if all(t.device == device for t in [*tensors.values(), *mb.fields.values()]):
        return mb
    return dataclasses.replace(mb, **{k: move(t) for k, t in tensors.items()},
                               fields={k: move(t) for k, t in mb.fields.items()})


@functools.lru_cache(maxsize=8)
def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked (megatron's convention). Passed explicitly because
    megatron's default mask is built on "cuda", which activation recomputation in CPU mode
    reaches outside the CPU-mode device redirection (autograd's backward)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


def attention_mask(seq_len: int, device: torch.device, *, context_parallel: bool) -> torch.Tensor | None:
    """The attention mask handed to GPTModel: None (causal attention by the kernel: TE's fused
    attention, or megatron's own cached mask under the local spec) on a GPU and under context
    parallelism (the core attention masks by zigzag positions, actor/context_parallel.py); the
    explicit [1, 1, S, S] `causal_mask` only on CPU, where megatron's default mask would be
    built on "cuda". A GPU never gets a materialized [S, S] tensor from here."""
    if context_parallel or device.type != "cpu":
        return None
    return causal_mask(seq_len, device)


def make_micro_batches(batch: TokenBatch, *, micro_batch_size: int, fixed_shape: bool,
                       seq_multiple: int = 1) -> list[MicroBatch]:
    """Splits the rows of `batch` (in order) into micro-batches. fixed_shape (PP > 1: the
    pipeline's p2p buffers have one shape) pads every micro-batch to [micro_batch_size, longest
    row]. seq_multiple: every micro-batch's sequence length is rounded up to a multiple of it
    (TP under sequence parallelism: megatron splits the sequence evenly over the TP ranks)."""
    seq_len = int(batch.lengths.max()) if fixed_shape else None
    return [build_micro_batch(batch.rows(i, i + micro_batch_size), seq_len=seq_len,
                              batch_size=micro_batch_size if fixed_shape else None,
                              seq_multiple=seq_multiple)
            for i in range(0, len(batch), micro_batch_size)]


def budget_micro_batches(batch: TokenBatch, *, token_budget: int, packed: bool = False,
                         seq_multiple: int = 1, dp_group=None) -> list[MicroBatch]:
    """Token-budget micro-batches of `batch` (`token_budget.plan_token_budget`: sorted by
    length, each padded to its own longest row, or packed into one row with `packed`). With
    dp_group the count is the same on every DP replica (split micro-batches, then fillers of
    zero loss weight: only training needs it). Each micro-batch's `sample_index` holds its
    rows of `batch`."""
    groups = plan_token_budget(batch.lengths.tolist(), token_budget, packed=packed,
                               seq_multiple=seq_multiple, dp_group=dp_group)
    build = build_packed_micro_batch if packed else build_micro_batch
    out = []
    for group in groups:
        index = torch.tensor(group, dtype=torch.int64)
        mb = build(batch.select(index) if group else filler_batch(list(batch.per_token)),
                   seq_multiple=seq_multiple)
        mb.sample_index = index
        out.append(mb)
    return out


def _forward_step(data_iterator, model, *, settings: ScoreSettings, tp_group, consume: Callable):
    mb: MicroBatch = next(data_iterator)
    device = model_device()
    packed = None
    if isinstance(mb, PackedMicroBatch):  # THD on TransformerEngine, a block mask on CPU
        mask, packed = packed_attention_inputs(mb, device)
    else:
        mask = attention_mask(mb.tokens.shape[1], device, context_parallel=getattr(mb, "cp_size", 1) > 1)
    output = model(mb.tokens.to(device), mb.position_ids.to(device), attention_mask=mask,
                   packed_seq_params=packed)
    return output, functools.partial(_score, mb, settings=settings, tp_group=tp_group,
                                     consume=consume)


def _score(mb: MicroBatch, logits: torch.Tensor, *, settings: ScoreSettings, tp_group,
           consume: Callable):
    """Last stage: logits [b, S, V_tp] -> log_probs [b, R] -> consume(mb, log_probs, entropy)."""
    rows, targets = mb.rows.to(logits.device), mb.targets.to(logits.device)
    log_probs, entropy = vocab_parallel_log_probs(
        logits.reshape(-1, logits.shape[-1]), rows, targets, tp_group=tp_group,
        vocab_size=settings.vocab_size, temperature=settings.temperature,
        chunk_size=settings.chunk_size, with_entropy=settings.with_entropy)
    mb.resp_row, mb.resp_col = mb.resp_row.to(logits.device), mb.resp_col.to(logits.device)
    # [b, R] response order, or [b, S/cp] local layout under context parallelism.
    return consume(mb, mb.scatter(log_probs),
                   mb.scatter(entropy) if entropy is not None else None)


def run_schedule(model_chunks: list, micro_batches: list[MicroBatch], *, pgs,
                 settings: ScoreSettings, consume: Callable, forward_only: bool) -> list:
    """Runs megatron's schedule over `micro_batches`; returns consume()'s metrics dicts (one per
    micro-batch) on the last PP stage and [] elsewhere.

    consume(mb, log_probs [b, R] float32, entropy [b, R] | None) -> (loss scalar, metrics dict)
    is called on the last stage per micro-batch; with forward_only=False the schedule runs
    backward from the loss (scaled 1/num_microbatches by megatron: the caller undoes that).
    Micro-batches may differ in shape under PP only with the model config's
    variable_seq_lengths (the actor sets it with a token budget); seq_length/micro_batch_size
    handed to megatron are then unused for the p2p exchange.
    The micro-batches are copied to the device first (`micro_batch_to`), so mb's tensors are
    on the device inside the schedule and nothing there waits for a copy or the host.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func(pp_size=pgs.pp.size())
    extra = {}
    if pgs.pp.size() > 1:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.utils import get_model_config

        # The 1F1B schedule wants the communicator too when process groups are passed.
        extra["p2p_communicator"] = P2PCommunicator(pgs.pp, get_model_config(model_chunks[0]))
    step = functools.partial(_forward_step, settings=settings, tp_group=pgs.tp, consume=consume)
    # Every micro-batch goes to the device before the schedule (asynchronously on CUDA), so
    # that no micro-batch waits for a host-to-device copy inside it.
    device = model_device()
    micro_batches = [micro_batch_to(mb, device) for mb in micro_batches]
    first = micro_batches[0]
    return forward_backward(
        forward_step_func=step, data_iterator=iter(micro_batches), model=model_chunks,
        num_microbatches=len(micro_batches), seq_length=first.tokens.shape[1] * pgs.cp.size(),
        micro_batch_size=first.tokens.shape[0], forward_only=forward_only, pg_collection=pgs, **extra)
