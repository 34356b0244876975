"""`PolicyActor`: the Megatron policy — HF weights in, per-token log-probs, optimizer steps with
a pluggable loss, distributed checkpoints, HF weights out.

Layout: TP x PP x CP x DP from `ActorConfig.dims`, optionally with megatron sequence
parallelism (`ActorConfig.sequence_parallel`). Every method is called on every
rank. The samples a rank receives are its DP replica's share (identical on all TP/PP/CP ranks
of that replica); under CP each rank runs its zigzag chunks of every sequence
(`actor/context_parallel.py`).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ctpo_megatron.actor.batching import PER_TOKEN_FIELDS, MicroBatch, check_sample
from ctpo_megatron.actor.config import ActorConfig
from ctpo_megatron.actor.context_parallel import cp_micro_batches, gather_response_layout
from ctpo_megatron.actor.schedule import (
    ScoreSettings, make_micro_batches, model_device, run_schedule,
)
from ctpo_megatron.models import hf_io
from ctpo_megatron.models.builder import build_gpt_model, resolve_use_te
from ctpo_megatron.models.config import model_spec_from_hf, transformer_config
from ctpo_megatron.parallel.cpu_mode import is_cpu_mode
from ctpo_megatron.parallel.state import init_parallel

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


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
    dims, pgs = init_parallel(cfg.dims, seed=cfg.seed)
    tf_config = transformer_config(spec, dims, params_dtype=cfg.params_dtype,
                                   recompute=cfg.recompute and cfg.recompute_granularity,
                                   sequence_parallel=cfg.sequence_parallel,
                                   cp_comm_type=cfg.cp_comm_type, overrides=cfg.transformer_overrides,
                                   use_te=use_te)
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

    def _micro_batches(self, samples: Sequence[dict], fields: Sequence[str] = ()) -> list[MicroBatch]:
        if not samples:
            raise ValueError("samples is empty: every DP rank needs at least one sample")
        for i, s in enumerate(samples):
            check_sample(s, i, max_len=self.spec.max_position_embeddings,
                         vocab_size=self.spec.vocab_size)
        if self.cp_size > 1:
            return cp_micro_batches(samples, self.pgs.cp, micro_batch_size=self.cfg.micro_batch_size,
                                    fixed_shape=self.pgs.pp.size() > 1, fields=fields,
                                    tp_size=self.dims.tp, sequence_parallel=self.cfg.sequence_parallel)
        return make_micro_batches(samples, micro_batch_size=self.cfg.micro_batch_size,
                                  fixed_shape=self.pgs.pp.size() > 1, fields=fields,
                                  seq_multiple=self.dims.tp if self.cfg.sequence_parallel else 1)

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
    def compute_log_probs(self, samples: Sequence[dict], *, with_entropy: bool = False
                          ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample log-probs of the response tokens under the current policy.

        Returns a list of [R_i] float32 CPU tensors (and, with_entropy, a second list of [R_i]
        entropies) on every rank of this DP replica (computed on the last PP stage, full over
        TP, broadcast over PP).
        """
        micro_batches = self._micro_batches(samples)
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
        lengths = [len(s["response_ids"]) for s in samples]
        per_sample = sum(lengths) * (2 if with_entropy else 1)
        flat = None
        if self.is_last_stage:
            pieces = []
            for mb, (lp, ent) in zip(micro_batches, outputs):
                pieces += mb.split(lp)
                if with_entropy:
                    pieces += mb.split(ent.float())
            flat = (torch.cat([p.reshape(-1) for p in pieces]) if pieces
                    else torch.zeros(0, device=model_device()))
        flat = self._broadcast_from_last_stage(flat, per_sample).cpu()
        log_probs, entropies, offset = [], [], 0
        for mb in micro_batches:
            for target in ([log_probs, entropies] if with_entropy else [log_probs]):
                for n in mb.response_lengths:
                    target.append(flat[offset: offset + n].clone())
                    offset += n
        return (log_probs, entropies) if with_entropy else log_probs

    # ------------------------------------------------------------------ training
    def train_step(self, samples: Sequence[dict], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this DP rank's share of a mini-batch.

        loss_fn(log_probs [b, R] float32 with grad, batch) -> (loss, metrics) is called per
        micro-batch on the last PP stage; batch holds old_log_probs, advantages, response_mask,
        rollout_is_weights as [b, R] float32 (0-padded) plus ints global_num_tokens (response
        mask sum over the whole mini-batch, all DP ranks) and dp_size. The loss must normalize
        with those (e.g. sum(mask * l) / global_num_tokens * dp_size): megatron's 1/num_microbatches
        scaling is undone here and DDP averages over DP, so the gradient equals that of the
        whole mini-batch loss on one rank. Returns metrics (mean over micro-batches and DP
        ranks), "loss" (the mini-batch loss), grad_norm and lr, on every rank.

        Under context parallelism (cp > 1) log_probs and the per-token fields are [b, S/cp] in
        the rank's local zigzag layout (`actor/context_parallel.py`; 0 where the rank scores no
        response token), global_num_tokens counts over DP and CP, dp_size is DP x CP (DDP's
        averaging group) and batch["cp_group"] is the CP group (also present, of size 1, at
        CP = 1); `context_parallel.context_parallel_policy_loss` is a loss for that layout.
        """
        micro_batches = self._micro_batches(samples, fields=PER_TOKEN_FIELDS)
        local_tokens = torch.tensor([float(sum(mb.fields["response_mask"].sum() for mb in micro_batches))],
                                    dtype=torch.float64, device=model_device())
        dist.all_reduce(local_tokens, group=self.pgs.dp_cp)  # CP ranks hold disjoint tokens
        global_num_tokens = int(round(local_tokens.item()))
        num_mb = len(micro_batches)
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        def consume(mb, log_probs, entropy):
            batch = {k: v.to(log_probs.device) for k, v in mb.fields.items()}
            # DDP averages gradients over DP x CP: normalizing by that size makes the summed
            # CP contributions the whole mini-batch's gradient (the loss contract).
            batch.update(global_num_tokens=global_num_tokens, dp_size=self.pgs.dp_cp.size(),
                         cp_group=self.pgs.cp)
            loss, metrics = loss_fn(log_probs, batch)
            out = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()}
            out["loss"] = float(loss.detach())
            # megatron divides each micro-batch loss by num_microbatches (and multiplies it by
            # the CP size, taking it for a CP-averaged loss); the loss is already normalized
            # by the global token count and DP x CP, so undo both.
            return loss * (num_mb / self.cp_size), out

        per_mb = run_schedule(self.model, micro_batches, pgs=self.pgs,
                              settings=self._settings(False), consume=consume, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.step_count += 1
        metrics = self._reduce_metrics(per_mb)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                       lr=float(self.optimizer.param_groups[0]["lr"]),
                       update_successful=float(bool(update_ok)))
        return metrics

    def _reduce_metrics(self, per_mb: list[dict]) -> dict[str, float]:
        """Mean over micro-batches ("loss": sum, the rank's share of the mini-batch loss), then
        mean over DP x CP; computed on the last stage and broadcast over PP."""
        pp = self.pgs.pp
        payload = [None]
        if self.is_last_stage:
            keys = sorted(per_mb[0])
            values = torch.tensor([sum(m[k] for m in per_mb) / (1 if k == "loss" else len(per_mb))
                                   for k in keys], dtype=torch.float64, device=model_device())
            dist.all_reduce(values, group=self.pgs.dp_cp)
            payload = [dict(zip(keys, (values / self.pgs.dp_cp.size()).tolist()))]
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

