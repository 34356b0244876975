"""Distributed checkpoints of the policy (model + optimizer) with megatron's dist_checkpointing.

Layout under a checkpoint root (a filesystem every rank sees):

    root/iter_0000012/        a complete megatron dist checkpoint (torch_dist format)
    root/iter_0000013.incomplete/   a save in progress (or killed midway): never loaded
    root/latest               "iter_0000012": the last complete save

A save writes into `<tag>.incomplete`; every rank fsyncs the files it wrote (its
`__<rank>_*.distcp` shards: on a multi-node filesystem only the writer's fsync flushes its
client cache), rank 0 then fsyncs the shared metadata and the directories, renames the
directory to `<tag>` and only then replaces `latest` atomically (write temp file, fsync, os.replace, fsync the
directory). A save killed at any point therefore leaves `latest` pointing at the previous
complete checkpoint. Model tensors are saved in megatron's global (layout-free) form, and the
distributed optimizer in its `fully_reshardable` form (per-parameter state, like a plain
optimizer), so a checkpoint loads under a
different TP/PP/DP layout.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ctpo_megatron.models.hf_io import unwrap_model

logger = logging.getLogger(__name__)

LATEST = "latest"
INCOMPLETE = ".incomplete"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SHARD_FILE = re.compile(r"__(\d+)_\d+\.distcp$")
"""torch_dist shard files are named `[<group>]__<global rank>_<n>.distcp` by the rank that wrote
them (megatron's FileSystemWriterAsync; the group prefix only with a separation hint)."""


def files_written_by(root: Path, rank: int) -> list[Path]:
    """The paths under the checkpoint directory `root` that `rank` must fsync: its own
    `__<rank>_*` shard files; rank 0 also every other file (metadata, common state) and every
    directory (deepest first). Each path belongs to exactly one rank."""
    owned: list[Path] = []
    dirs: list[Path] = []
    for dirpath, _, files in os.walk(root):
        dirs.append(Path(dirpath))
        for name in sorted(files):
            match = _SHARD_FILE.search(name)
            writer = int(match.group(1)) if match else 0
            if writer == rank:
                owned.append(Path(dirpath) / name)
    return owned + (dirs[::-1] if rank == 0 else [])


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_path(root)


def read_latest(root: str | os.PathLike) -> Path | None:
    """The directory `root/latest` points to, or None when there is no complete checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = Path(root) / tag
    if not tag or not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {path} does not exist")
    return path


def _model_state(model_chunk) -> dict:
    """The model part of a checkpoint: `{"model": <the chunk's sharded state dict>}`."""
    return {"model": unwrap_model(model_chunk).sharded_state_dict()}


def _state(actor, *, is_loading: bool, with_optimizer: bool) -> dict:
    state = _model_state(actor.model[0])
    model_sd = state["model"]
    if with_optimizer:
        if is_loading:
            _materialize_optimizer_state(actor.optimizer)
        state["optimizer"] = actor.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA)
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state tensors for the checkpoint to load into (megatron's
    state_dict asserts on them without TE/Apex); create them (zeros) the way megatron's FSDP
    path does. The values are overwritten by the load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _skip_step_in_state_copy(optimizer) -> None:
    """megatron-core 0.16 with torch's Adam (no TE/Apex) sets Adam's "step" from the param
    groups, then copies every state key from the per-parameter checkpoint tensors, which do not
    hold "step" (KeyError). Copy only the keys the checkpoint has."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue  # that path copies only the given keys already

        def set_states(model_param, tensors, opt=opt):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **opt.optimizer.state[main_param]}
            for key, value in tensors.items():
                dst[key].copy_(value)

        opt._set_main_param_and_optimizer_states = set_states


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16 (no TE/Apex) loads one "step" tensor object into every parameter's
    Adam state; torch's foreach Adam then increments that shared tensor once per parameter,
    corrupting the bias correction. Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def save_checkpoint(actor, ckpt_dir: str | os.PathLike, extra_state: dict) -> str:
    """Saves `actor`'s model and optimizer state plus `extra_state` (picklable, from rank 0)
    as `ckpt_dir/iter_<step>`; returns that path. Called on every rank."""
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    tag = f"iter_{actor.step_count:07d}"
    final, tmp = root / tag, root / (tag + INCOMPLETE)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed midway
        tmp.mkdir()
    dist.barrier()
    state = _state(actor, is_loading=False, with_optimizer=True)
    state["extra_state"] = dict(extra_state)
    state["step_count"] = actor.step_count
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()  # every shard is on disk (in some page cache) before anyone lists them
    for path in files_written_by(tmp, dist.get_rank()):
        _fsync_path(path)
    dist.barrier()  # every rank's shards are durable before `latest` may name them
    if dist.get_rank() == 0:
        if final.exists():  # re-saving the same step: keep the old copy until the new one is in
            old = root / (tag + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            _write_latest(root, tag)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
            _write_latest(root, tag)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return str(final)


def load_model_weights(model_chunk, path: str | os.PathLike) -> None:
    """Loads only the model weights of the checkpoint directory `path` (an `iter_*` directory,
    not the root) into `model_chunk`, a GPTModel chunk of any TP/PP layout (each rank reads
    only its own slices; no optimizer needed). Called on every rank."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_model_state(model_chunk), str(path))
    unwrap_model(model_chunk).load_state_dict(loaded["model"])


def load_checkpoint(actor, ckpt_dir: str | os.PathLike, *, load_optimizer: bool = True) -> dict:
    """Loads the checkpoint `ckpt_dir/latest` points to into `actor` (any TP/PP layout);
    returns the saved extra_state. Raises FileNotFoundError when there is none."""
    from megatron.core import dist_checkpointing

    path = read_latest(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (no {LATEST} file)")
    state = _state(actor, is_loading=True, with_optimizer=load_optimizer)
    loaded = dist_checkpointing.load(state, str(path))
    unwrap_model(actor.model[0]).load_state_dict(loaded["model"])
    if load_optimizer:
        _skip_step_in_state_copy(actor.optimizer)
        actor.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(actor.optimizer)
    else:
        actor.optimizer.reload_model_params()  # main (fp32) params follow the loaded weights
    actor.step_count = int(loaded.get("step_count", 0))
    logger.info("loaded checkpoint %s (step %d)", path, actor.step_count)
    return dict(loaded.get("extra_state") or {})
