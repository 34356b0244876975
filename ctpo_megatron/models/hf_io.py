"""HF safetensors <-> megatron TP/PP shards.

- `load_hf_weights`: every rank reads only the slices of the HF tensors it owns.
- `iter_hf_weights`: streams full HF tensors to global rank 0 (TP shards gathered, other PP
  stages' tensors sent over), for weight sync and export.
- `export_hf_checkpoint`: writes a checkpoint `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ctpo_megatron.models.config import ModelSpec
from ctpo_megatron.models.safetensors_io import (
    INDEX_FILE, SafetensorsReader, ShardedSafetensorsWriter,
)
from ctpo_megatron.models.weight_map import (
    ParamMap, assemble_shard, build_param_maps, full_to_hf, shard_slices,
)

logger = logging.getLogger(__name__)


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strips DDP / Float16Module wrappers down to the GPTModel built by `build_gpt_model`."""
    while not hasattr(chunk, "ctpo_model_spec"):
        if not hasattr(chunk, "module"):
            raise TypeError(f"{type(chunk).__name__} is not a GPTModel built by build_gpt_model")
        chunk = chunk.module
    return chunk


def _single_chunk(model_chunks: Sequence[torch.nn.Module] | torch.nn.Module) -> torch.nn.Module:
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    if len(model_chunks) != 1:
        raise NotImplementedError(f"{len(model_chunks)} model chunks: virtual pipeline stages "
                                  "are not supported")
    return unwrap_model(model_chunks[0])


def _is_tied_copy(spec: ModelSpec, name: str) -> bool:
    # The last stage's copy of a tied embedding is the same HF tensor as the first stage's.
    return spec.tie_word_embeddings and name == "output_layer.weight"


@torch.no_grad()
def load_hf_weights(model_chunks, pgs, hf_model_dir: str | os.PathLike) -> None:
    """Loads an HF checkpoint into this rank's shard of the model.

    Each rank reads only the slices it owns. Raises ValueError naming the tensor when an HF
    tensor is missing or has the wrong shape.
    """
    model = _single_chunk(model_chunks)
    spec: ModelSpec = model.ctpo_model_spec
    tp_rank, tp = pgs.tp.rank(), pgs.tp.size()
    reader = SafetensorsReader(hf_model_dir)
    params = dict(model.named_parameters())
    try:
        for pmap in build_param_maps(model, spec, tp):
            param = params[pmap.megatron_name]
            parts = [reader.read(name, index, expected_shape=shape) for name, index, shape in
                     zip(pmap.hf_names, shard_slices(pmap, spec, tp_rank, tp), pmap.hf_shapes)]
            shard = assemble_shard(pmap, spec, parts, tp, tuple(param.shape))
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{pmap.hf_names}: TP shard has shape {tuple(shard.shape)}, "
                                 f"megatron parameter {pmap.megatron_name} has {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
    finally:
        reader.close()
    logger.info("loaded %s (tp rank %d/%d, pp rank %d/%d)", hf_model_dir, tp_rank, tp,
                pgs.pp.rank(), pgs.pp.size())


def _gather_tp(tensor: torch.Tensor, tp_group) -> list[torch.Tensor]:
    if tp_group.size() == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp_group.size())]
    dist.all_gather(shards, tensor.contiguous(), group=tp_group)
    return shards


@torch.no_grad()
def iter_hf_weights(model_chunks, pgs, *, dtype: torch.dtype | None = None
                    ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yields `(hf_name, full_tensor)` for every HF tensor of the model, on global rank 0.

    Must be iterated on every rank of the model-parallel group in lockstep: TP ranks of the
    owning stage all-gather the shards (over pgs.tp), and stages other than the first send their
    tensors to rank 0 (over pgs.pp). Ranks other than global rank 0 in data-parallel replica 0
    yield `(hf_name, None)` in the same order; ranks of other DP replicas yield nothing and do
    no communication. Names and shapes are those of the HF safetensors export (a tied lm_head is
    not yielded; `model.embed_tokens.weight` stands for it). dtype: cast before communicating
    (default: the parameters' dtype).
    """
    model = _single_chunk(model_chunks)
    spec: ModelSpec = model.ctpo_model_spec
    if pgs.dp.rank() != 0 or pgs.cp.rank() != 0:
        return
    tp_group, pp_group = pgs.tp, pgs.pp
    tp_rank, tp, pp_rank = tp_group.rank(), tp_group.size(), pp_group.rank()
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device  # NCCL needs receive buffers on the GPU
    local = []
    for pmap in build_param_maps(model, spec, tp):
        if _is_tied_copy(spec, pmap.megatron_name) and pp_rank != 0:
            continue
        param = params[pmap.megatron_name]
        local.append((pmap, tuple(param.shape), dtype or param.dtype))
    stage_maps: list = [None] * pp_group.size()
    dist.all_gather_object(stage_maps, local, group=pp_group)
    for stage, entries in enumerate(stage_maps):
        for pmap, shard_shape, send_dtype in entries:
            hf_tensors = None
            if stage == pp_rank:
                shard = params[pmap.megatron_name].detach().to(send_dtype)
                shards = _gather_tp(shard, tp_group)
                if tp_rank == 0:
                    hf_tensors = [t.contiguous() for t in full_to_hf(pmap, spec, shards)]
            if tp_rank == 0 and stage != 0 and pp_rank in (0, stage):
                hf_tensors = _send_stage_to_first(pmap, hf_tensors, send_dtype, stage, pp_group,
                                                  device)
            global_zero = tp_rank == 0 and pp_rank == 0
            for i, name in enumerate(pmap.hf_names):
                yield name, hf_tensors[i] if global_zero else None


def _send_stage_to_first(pmap: ParamMap, hf_tensors, dtype: torch.dtype, stage: int, pp_group,
                         device: torch.device):
    """Moves one parameter's HF tensors from PP stage `stage` to stage 0 (TP rank 0 only)."""
    if pp_group.rank() == stage:
        for t in hf_tensors:
            dist.send(t, group=pp_group, group_dst=0)
        return None
    received = [torch.empty(shape, dtype=dtype, device=device) for shape in pmap.hf_shapes]
    for t in received:
        dist.recv(t, group=pp_group, group_src=stage)
    return received


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def export_hf_checkpoint(model_chunks, pgs, out_dir: str | os.PathLike,
                         hf_config_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                         max_shard_bytes: int = 5 * 2**30,
                         on_tensor: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Writes this model as an HF checkpoint in `out_dir` (called on every rank).

    Config, generation config and tokenizer files are copied from `hf_config_dir` (weight files
    and weight indexes are not); the weights are streamed to global rank 0 (see
    `iter_hf_weights`) and written as safetensors shards of at most `max_shard_bytes`, so rank 0
    holds at most one shard's worth of full tensors at a time. dtype: of the written tensors
    (config.json's dtype is set to match); default is the `torch_dtype`/`dtype` in
    hf_config_dir's config.json, so a load -> export round trip is bit-exact. on_tensor: called
    on global rank 0 after each tensor is queued for writing (progress reporting).
    """
    if dtype is None:
        dtype = _config_dtype(Path(hf_config_dir))
    writer = None
    if dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:
            stale.unlink(missing_ok=True)
        for src in Path(hf_config_dir).iterdir():
            if src.is_file() and not src.name.endswith(_WEIGHT_FILES + (".index.json",)):
                shutil.copy2(src, out / src.name)
        if dtype is not None:
            _set_config_dtype(out / "config.json", dtype)
        writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes)
    for name, tensor in iter_hf_weights(model_chunks, pgs, dtype=dtype):
        if writer is not None:
            writer.add(name, tensor)
            if on_tensor is not None:
                on_tensor(name, tensor)
    if writer is not None:
        files = writer.finish()
        logger.info("exported HF checkpoint to %s (%d files)", out_dir, len(files))
    dist.barrier()


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Records the written dtype in config.json (loaders default to it)."""
    if not config_path.is_file():
        return
    with open(config_path) as f:
        cfg = json.load(f)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    if all(cfg.get(k) == name for k in keys):
        return  # unchanged: keep the copied file as it is
    for key in keys:
        cfg[key] = name
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def _config_dtype(config_dir: Path) -> torch.dtype | None:
    path = config_dir / "config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None
