"""`PolicyActor`: the Megatron policy — HF weights in, per-token log-probs, optimizer steps with
a pluggable loss, distributed checkpoints, HF weights out.

Layout: TP x PP x CP x DP from `ActorConfig.dims`, optionally with megatron sequence
parallelism (`ActorConfig.sequence_parallel`). Every method is called on every
rank. The batch a rank receives is its DP replica's share (identical on all TP/PP/CP ranks of
that replica), as a `TokenBatch` (padded tensors) or, for convenience, a list of sample dicts;
under CP each rank runs its zigzag chunks of every sequence (`actor/context_parallel.py`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ctpo_megatron.actor.batching import MicroBatch, TokenBatch
from ctpo_megatron.actor.config import ActorConfig
from ctpo_megatron.actor.context_parallel import cp_micro_batches, gather_response_layout
from ctpo_megatron.actor.packing import check_packing_backend
from ctpo_megatron.actor.schedule import (
    ScoreSettings, budget_micro_batches, make_micro_batches, model_device, run_schedule,
)
from ctpo_megatron.models import hf_io
from ctpo_megatron.models.builder import build_gpt_model, resolve_use_te
from ctpo_megatron.models.config import model_spec_from_hf, transformer_config
from ctpo_megatron.parallel.cpu_mode import is_cpu_mode
from ctpo_megatron.parallel.state import init_parallel

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, Any]]
"""loss_fn(log_probs [b, R], batch) -> (loss, stats); see `PolicyActor.train_step`."""

PER_TOKEN_FIELDS = ("old_log_probs", "advantages", "response_mask", "rollout_is_weights")
"""The per-token fields a list-of-dicts batch carries into `train_step`."""


@dataclass
class UpdateResult:
    """One optimizer update: the optimizer's numbers (same on every rank) and the loss's stats."""

    grad_norm: float
    """Global gradient norm before clipping (nan when the optimizer did not report one)."""
    lr: float
    """Learning rate of the update."""
    update_successful: bool
    """False when the optimizer skipped the update (bf16 overflow)."""
    stats: Any
    """Sum over this rank's micro-batches of the stats loss_fn returned (tensors stay on the
    device; nothing is reduced over ranks: see `PolicyActor.reduce_sum`). None on PP stages
    other than the last, which never run the loss."""


def _add_stats(total: Any, stats: Any) -> Any:
    """total + stats: dicts key-wise, other objects (tensors, typed sums) with `+`."""
    if total is None:
        return stats
    if isinstance(total, dict):
        return {k: total[k] + stats[k] for k in total}
    return total + stats


def as_token_batch(batch: TokenBatch | Sequence[dict], fields: Sequence[str] = ()) -> TokenBatch:
    """`batch` itself, or the sample dicts packed into a `TokenBatch` (see `from_samples`)."""
    return batch if isinstance(batch, TokenBatch) else TokenBatch.from_samples(batch, fields)


def build_policy_model(cfg: ActorConfig, *, load_hf_weights: bool = True):
    """Creates the process groups of `cfg.dims` and builds this rank's GPTModel chunk (no DDP,
    no optimizer), in `cfg.params_dtype`, on the GPU unless in CPU mode.

    load_hf_weights: fill it from `cfg.hf_model_dir`'s safetensors (each rank reads its own
    slices); otherwise the weights are whatever the builder left (load a checkpoint next).
    Returns (model, spec, resolved dims, process groups, TransformerConfig). Needs
    `init_distributed()` first.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(cfg.hf_model_dir)
    if not dist.is_initialized():
        raise RuntimeError("build_policy_model: call init_distributed() first")
    # Validate the model against the layout before the first collective.
    spec = model_spec_from_hf(hf_config, cfg.dims.resolve(dist.get_world_size()),
                              make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    use_te = resolve_use_te(allow_local_spec=cfg.allow_local_spec)  # refuses a silent fallback
    check_packing_backend(cfg.pack_sequences, use_te=use_te, on_gpu=not is_cpu_mode())
    dims, pgs = init_parallel(cfg.dims, seed=cfg.seed)
    tf_config = transformer_config(spec, dims, params_dtype=cfg.params_dtype,
                                   recompute=cfg.recompute and cfg.recompute_granularity,
                                   sequence_parallel=cfg.sequence_parallel,
                                   cp_comm_type=cfg.cp_comm_type, overrides=cfg.transformer_overrides,
                                   use_te=use_te)
    if cfg.micro_batch_tokens and dims.pp > 1:
        # Token-budget micro-batches differ in shape: the p2p exchange sends each one's shape first.
        tf_config.variable_seq_lengths = True
    model = build_gpt_model(spec, tf_config, pgs, use_te=use_te)
    if cfg.params_dtype == "bfloat16":
        model.to(torch.bfloat16)
    if torch.cuda.is_available() and not is_cpu_mode():
        model.cuda(torch.cuda.current_device())
    if load_hf_weights:
        hf_io.load_hf_weights(model, pgs, cfg.hf_model_dir)
    return model, spec, dims, pgs, tf_config


class PolicyActor:
    """The policy on megatron-core: GPTModel + DDP + (Distributed)Optimizer.

    Construct after `init_distributed()`; this calls `init_parallel(cfg.dims)`, builds the
    model chunk of this PP stage, loads `cfg.hf_model_dir` into the TP/PP shards and creates
    the optimizer.
    """

    def __init__(self, cfg: ActorConfig):
        from megatron.core.distributed import (
            DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        self.cfg = cfg
        model, self.spec, self.dims, self.pgs, self.tf_config = build_policy_model(cfg)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            check_for_nan_in_grad=True,  # bf16 has no loss scaler: a NaN grad must stop the step
            use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.model = [DistributedDataParallel(self.tf_config, ddp_config, model,
                                              pg_collection=self.pgs)]
        bf16 = cfg.params_dtype == "bfloat16"
        opt_config = OptimizerConfig(
            optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], adam_eps=cfg.adam_eps,
            sgd_momentum=cfg.sgd_momentum, clip_grad=cfg.clip_grad, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, self.model, pg_collection=self.pgs,
                                                use_gloo_process_groups=False)
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.grad_scale_func = self.optimizer.scale_loss
        self.set_lr(cfg.lr)
        self.step_count = 0
        self._token_counts = [0, 0]  # tokens computed, useful tokens since `pop_token_counts`

    # ------------------------------------------------------------------ helpers
    @property
    def is_last_stage(self) -> bool:
        return self.pgs.pp.rank() == self.pgs.pp.size() - 1

    @property
    def dp_size(self) -> int:
        return self.pgs.dp.size()

    @property
    def cp_size(self) -> int:
        return self.pgs.cp.size()

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of every parameter group (for the trainer's schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _settings(self, with_entropy: bool) -> ScoreSettings:
        return ScoreSettings(vocab_size=self.spec.vocab_size, temperature=self.cfg.temperature,
                             chunk_size=self.cfg.logprob_chunk_size, with_entropy=with_entropy)

    def _micro_batches(self, batch: TokenBatch, *, same_count_over_dp: bool = False) -> list[MicroBatch]:
        """The micro-batches of `batch` (fixed size, or by `cfg.micro_batch_tokens`); with
        same_count_over_dp (training: DDP's gradient reduction) a token-budget plan has the
        same count on every DP replica. Adds to the padding counters."""
        batch.check(max_len=self.spec.max_position_embeddings, vocab_size=self.spec.vocab_size)
        cfg = self.cfg
        budget = cfg.micro_batch_tokens
        dp_group = self.pgs.dp if same_count_over_dp else None
        if self.cp_size > 1:
            mbs = cp_micro_batches(batch, self.pgs.cp, micro_batch_size=cfg.micro_batch_size,
                                   fixed_shape=self.pgs.pp.size() > 1, tp_size=self.dims.tp,
                                   sequence_parallel=cfg.sequence_parallel, token_budget=budget,
                                   dp_group=dp_group)
        elif budget:
            mbs = budget_micro_batches(batch, token_budget=budget, packed=cfg.pack_sequences,
                                       seq_multiple=self.dims.tp if cfg.sequence_parallel else 1,
                                       dp_group=dp_group)
        else:
            mbs = make_micro_batches(batch, micro_batch_size=cfg.micro_batch_size,
                                     fixed_shape=self.pgs.pp.size() > 1,
                                     seq_multiple=self.dims.tp if cfg.sequence_parallel else 1)
        self._token_counts[0] += sum(mb.computed_tokens for mb in mbs)
        self._token_counts[1] += int(batch.lengths.sum())
        return mbs

    def pop_token_counts(self) -> dict[str, float]:
        """This DP replica's tokens computed (padding included) and useful tokens (prompt +
        response) over the `score`/`train_step` calls since the last pop, then resets them.
        Their ratio over all replicas is the padding waste (`trainer.metrics.padding_metrics`)."""
        computed, useful = self._token_counts
        self._token_counts = [0, 0]
        return {"perf/actor_tokens_computed": float(computed), "perf/actor_tokens_useful": float(useful)}

    def _broadcast_from_last_stage(self, flat: torch.Tensor | None, numel: int) -> torch.Tensor:
        pp = self.pgs.pp
        if pp.size() == 1:
            return flat
        if flat is None:
            flat = torch.empty(numel, dtype=torch.float32, device=model_device())
        dist.broadcast(flat, group=pp, group_src=pp.size() - 1)
        return flat

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def score(self, batch: TokenBatch, *, with_entropy: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the response tokens under the current policy.

        Returns [N, R] float32 CPU (R = batch's longest response, 0 past each R_i), and with
        with_entropy the [N, R] entropies too, on every rank of this DP replica (computed on
        the last PP stage, full over TP, broadcast over PP).
        """
        micro_batches = self._micro_batches(batch)
        for chunk in self.model:
            chunk.eval()
        outputs: list = []

        def consume(mb, log_probs, entropy):
            if self.cp_size > 1:  # local zigzag layout -> [b, R] response order, full over CP
                log_probs = gather_response_layout(mb, log_probs, self.pgs.cp)
                entropy = None if entropy is None else gather_response_layout(mb, entropy, self.pgs.cp)
            outputs.append((log_probs.float(), entropy))
            return log_probs.new_zeros(()), {}

        run_schedule(self.model, micro_batches, pgs=self.pgs,
                     settings=self._settings(with_entropy), consume=consume, forward_only=True)
        n, r = len(batch), max(int(batch.response_lens.max()), 1)
        planes = 2 if with_entropy else 1
        out = None
        if self.is_last_stage:
            out = torch.zeros((planes, n, r), dtype=torch.float32, device=model_device())
            row = 0
            for mb, (lp, ent) in zip(micro_batches, outputs):
                width = lp.shape[1]
                if mb.sample_index is None:  # consecutive rows
                    k, rows = mb.num_samples, slice(row, row + mb.num_samples)
                else:  # token-budget micro-batches hold rows sorted by length
                    k, rows = mb.sample_index.numel(), mb.sample_index.to(out.device)
                out[0, rows, :width] = lp[:k]
                if with_entropy:
                    out[1, rows, :width] = ent[:k].float()
                row += k
            out = out.reshape(-1)
        out = self._broadcast_from_last_stage(out, planes * n * r).cpu().reshape(planes, n, r)
        return (out[0], out[1]) if with_entropy else out[0]

    def compute_log_probs(self, samples: TokenBatch | Sequence[dict], *, with_entropy: bool = False
                          ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`score` as lists of [R_i] float32 CPU tensors, one per sample."""
        batch = as_token_batch(samples)
        lengths = batch.response_lens.tolist()
        scored = self.score(batch, with_entropy=with_entropy)
        split = lambda t: [t[i, :n].clone() for i, n in enumerate(lengths)]  # noqa: E731
        return (split(scored[0]), split(scored[1])) if with_entropy else split(scored)

    # ------------------------------------------------------------------ training
    def train_step(self, batch: TokenBatch | Sequence[dict], loss_fn: LossFn, *,
                   global_num_tokens: int | None = None) -> UpdateResult:
        """One optimizer step over this DP rank's share of a mini-batch.

        loss_fn(log_probs [b, R] float32 with grad, inputs) -> (loss, stats) is called per
        micro-batch on the last PP stage; inputs holds the batch's per-token fields as [b, R]
        float32 (0-padded; e.g. old_log_probs, advantages, response_mask, rollout_is_weights)
        plus ints global_num_tokens (response-mask sum over the whole mini-batch, all DP ranks:
        the caller's value, else one all-reduce here) and dp_size. The loss must normalize
        with those (e.g. sum(mask * l) / global_num_tokens * dp_size): megatron's
        1/num_microbatches scaling is undone here and DDP averages over DP, so the gradient
        equals that of the whole mini-batch loss on one rank. `stats` (tensors, a dict of
        tensors or any type with `+`) are summed over micro-batches on the device and returned
        unreduced in `UpdateResult.stats`.

        Under context parallelism (cp > 1) log_probs and the per-token fields are [b, S/cp] in
        the rank's local zigzag layout (`actor/context_parallel.py`; 0 where the rank scores no
        response token), global_num_tokens counts over DP and CP, dp_size is DP x CP (DDP's
        averaging group) and inputs["cp_group"] is the CP group (also present, of size 1, at
        CP = 1); `context_parallel.context_parallel_policy_loss` is a loss for that layout.
        """
        batch = as_token_batch(batch, PER_TOKEN_FIELDS)
        micro_batches = self._micro_batches(batch, same_count_over_dp=True)
        if global_num_tokens is None:
            local = torch.tensor([float(sum(mb.fields["response_mask"].sum() for mb in micro_batches))],
                                 dtype=torch.float64, device=model_device())
            dist.all_reduce(local, group=self.pgs.dp_cp)  # CP ranks hold disjoint tokens
            global_num_tokens = int(round(local.item()))
        num_mb = len(micro_batches)
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        total: list[Any] = [None]

        def consume(mb, log_probs, entropy):
            inputs = {k: v.to(log_probs.device) for k, v in mb.fields.items()}
            # DDP averages gradients over DP x CP: normalizing by that size makes the summed
            # CP contributions the whole mini-batch's gradient (the loss contract).
            inputs.update(global_num_tokens=global_num_tokens, dp_size=self.pgs.dp_cp.size(),
                          cp_group=self.pgs.cp)
            loss, stats = loss_fn(log_probs, inputs)
            total[0] = _add_stats(total[0], stats)
            # megatron divides each micro-batch loss by num_microbatches (and multiplies it by
            # the CP size, taking it for a CP-averaged loss); the loss is already normalized
            # by the global token count and DP x CP, so undo both.
            return loss * (num_mb / self.cp_size), {}

        run_schedule(self.model, micro_batches, pgs=self.pgs, settings=self._settings(False),
                     consume=consume, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.step_count += 1
        return UpdateResult(grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                            lr=float(self.optimizer.param_groups[0]["lr"]),
                            update_successful=bool(update_ok), stats=total[0])

    def reduce_sum(self, stats: Any, max_keys: Sequence[str] = ()) -> Any:
        """Sums per-rank stats (a dict of tensors, or a type with `to_vectors`/`from_vectors`)
        over the DP x CP ranks of the last PP stage (CP ranks hold disjoint tokens) and returns them on every rank (broadcast over
        PP). Dict keys in `max_keys` are reduced with max instead. One call per step: the
        stats of all its updates are added first."""
        pp = self.pgs.pp
        payload = [None]
        if self.is_last_stage:
            if isinstance(stats, dict):
                keys = sorted(stats)
                sums = [k for k in keys if k not in max_keys]
                maxes = [k for k in keys if k in max_keys]
                vectors = (_flat([stats[k] for k in sums]), _flat([stats[k] for k in maxes]))
            else:
                vectors = stats.to_vectors()
            vectors = tuple(v.to(device=model_device(), dtype=torch.float64) for v in vectors)
            dist.all_reduce(vectors[0], group=self.pgs.dp_cp)
            dist.all_reduce(vectors[1], op=dist.ReduceOp.MAX, group=self.pgs.dp_cp)
            if isinstance(stats, dict):
                reduced = dict(zip(sums, vectors[0].tolist()))
                reduced.update(zip(maxes, vectors[1].tolist()))
                payload = [reduced]
            else:
                payload = [stats.from_vectors(*(v.cpu() for v in vectors))]
        if pp.size() > 1:
            dist.broadcast_object_list(payload, group=pp, group_src=pp.size() - 1)
        return payload[0]

    # ------------------------------------------------------------------ weights
    def iter_hf_weights(self, *, dtype: torch.dtype | None = None
                        ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """HF-named full tensors on global rank 0 (see `models.hf_io.iter_hf_weights`)."""
        return hf_io.iter_hf_weights(self.model, self.pgs, dtype=dtype)

    def export_hf(self, out_dir: str, *, dtype: torch.dtype | None = None) -> None:
        """Writes an HF checkpoint (config/tokenizer copied from cfg.hf_model_dir)."""
        hf_io.export_hf_checkpoint(self.model, self.pgs, out_dir, self.cfg.hf_model_dir, dtype=dtype)

    def save_checkpoint(self, ckpt_dir: str, extra_state: dict | None = None) -> str:
        """Saves model + optimizer state (megatron dist checkpoint) as a new step directory
        under `ckpt_dir` and points `latest` at it only once complete. Returns its path."""
        from ctpo_megatron.actor.checkpoint import save_checkpoint

        return save_checkpoint(self, ckpt_dir, extra_state or {})

    def load_checkpoint(self, ckpt_dir: str, *, load_optimizer: bool = True) -> dict:
        """Loads the checkpoint `latest` points to (any TP/PP layout); returns its extra_state."""
        from ctpo_megatron.actor.checkpoint import load_checkpoint

        return load_checkpoint(self, ckpt_dir, load_optimizer=load_optimizer)


def _flat(values: list) -> torch.Tensor:
    """0-d tensors / floats -> one [K] float64 tensor (one device-to-host copy later)."""
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([torch.as_tensor(v).detach().to(torch.float64).cpu().reshape(()) for v in values])
