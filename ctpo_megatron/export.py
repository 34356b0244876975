"""Export a training checkpoint as a Hugging Face model directory.

    python -m ctpo_megatron.export RUN_DIR OUT_DIR                  # one process: small models
    torchrun --nproc-per-node 8 -m ctpo_megatron.export RUN_DIR OUT_DIR --dtype bf16   # large

CHECKPOINT_OR_RUN_DIR is a run directory (its `checkpoints/latest`), a checkpoint root holding `latest`,
or one `iter_*` checkpoint directory; `--step N` picks `iter_N` instead of `latest`. The
checkpoint may have been saved at any TP/PP/CP layout (megatron stores it layout-free); the
export runs at its own layout (`--tp`/`--pp`, default: the training layout when the world size
matches it, else TP = world size), and each rank reads only its own slices of the checkpoint.

Memory: every rank holds its model shard (model bytes / (tp x pp)) plus a few transient copies
of the tensor being gathered; rank 0 in addition holds at most one output file's worth of full
tensors (`--max-shard-size`) while writing. A single process therefore holds the whole model:
use torchrun with several ranks when it does not fit.

OUT_DIR gets config.json (dtype set to the written one), generation_config.json, the tokenizer
files of the base model, and the weights as safetensors (`model.safetensors`, or
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`). It is written as
`OUT_DIR.incomplete` and renamed at the end, so an interrupted export never looks complete.
Load it with `AutoModelForCausalLM.from_pretrained(OUT_DIR)` or serve it with SGLang's
`--model-path OUT_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ctpo_megatron.export")

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
_ITER = re.compile(r"^iter_(\d+)$")
_CKPT_FILES = ("metadata.json", ".metadata", "common.pt")
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|"
                              r"added_tokens\.json|chat_template.*|.*\.tiktoken|.*\.model)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(ValueError):
    """The checkpoint, run directory or base model is missing or incomplete (message says what)."""


# ---------------------------------------------------------------------------- finding things
def parse_size(text: str) -> int:
    """`5GB` -> 5e9 bytes, `2GiB` -> 2 * 2**30, `1000000` -> bytes (Hugging Face's spelling)."""
    match = _SIZE.match(str(text))
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be at least 1 byte")
    return int(value)


def _complete_steps(root: Path) -> list[int]:
    return sorted(int(m.group(1)) for d in root.iterdir() if d.is_dir() and (m := _ITER.match(d.name)))


def _from_root(root: Path, step: int | None) -> Path:
    from ctpo_megatron.actor.checkpoint import INCOMPLETE, LATEST, read_latest

    if not root.is_dir():
        raise CheckpointError(f"{root} does not exist: the run saved no checkpoint yet "
                              "(see trainer.save_every)")
    partial = sorted(d.name for d in root.glob(f"*{INCOMPLETE}"))
    if step is not None:
        path = root / f"iter_{step:07d}"
        if path.is_dir():
            return path
        cut = f"; its save was cut off ({path.name}{INCOMPLETE})" if (
            root / (path.name + INCOMPLETE)).exists() else ""
        raise CheckpointError(f"no checkpoint of step {step} in {root}{cut}; complete checkpoints: "
                              f"steps {_complete_steps(root) or 'none'}")
    try:
        latest = read_latest(root)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    if latest is None:
        hint = (f"; only partial saves: {', '.join(partial)} (the run stopped while saving)"
                if partial else "")
        raise CheckpointError(f"no complete checkpoint in {root}: no {LATEST} file{hint}")
    return latest


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None
                       ) -> tuple[Path, Path | None]:
    """The checkpoint directory `path` means, and the run directory above it (None if none).

    path: a run directory (`checkpoints/` and/or `config.yaml` inside), a checkpoint root
    (`latest` or `iter_*` inside) or one checkpoint (`metadata.json` inside). step: pick
    `iter_<step>` of the run/root instead of `latest`. Raises CheckpointError naming what is
    missing.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory (expected a run directory or a checkpoint)")
    if (p / CHECKPOINTS).is_dir() or (p / RUN_CONFIG).is_file():
        return _from_root(p / CHECKPOINTS, step), p
    run_dir = p.parent if (p.parent / RUN_CONFIG).is_file() else None
    if (p / "latest").exists() or any(_ITER.match(d.name) for d in p.iterdir()):
        return _from_root(p, step), run_dir
    if (p / "metadata.json").is_file() or _ITER.match(p.name):
        if step is not None:
            raise CheckpointError(f"--step {step}: {p} is one checkpoint already; pass its run "
                                  "directory to choose a step")
        above = p.parent.parent
        return p, above if (above / RUN_CONFIG).is_file() else None
    raise CheckpointError(f"{p} is neither a run directory (checkpoints/ inside), a checkpoint "
                          "root (latest inside) nor a checkpoint (metadata.json inside)")


def check_checkpoint_files(ckpt: Path):
    """Checks every file of the megatron dist checkpoint `ckpt` exists with the size its index
    promises; returns torch's checkpoint `Metadata`. Raises CheckpointError naming missing or
    truncated files."""
    from torch.distributed.checkpoint import FileSystemReader

    missing = [name for name in _CKPT_FILES if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {', '.join(missing)} missing")
    try:
        metadata = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a torn pickle raises anything
        raise CheckpointError(f"checkpoint {ckpt}: cannot read .metadata ({e})") from e
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for rel, size in sorted(needed.items()):
        file = ckpt / rel
        if not file.is_file():
            problems.append(f"{rel} missing")
        elif file.stat().st_size < size:
            problems.append(f"{rel} truncated ({file.stat().st_size} of {size} bytes)")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is partial: {'; '.join(problems)}")
    return metadata


def read_run_config(run_dir: Path | None) -> dict:
    """The run's saved `config.yaml` as plain containers ({} without a run directory)."""
    if run_dir is None or not (run_dir / RUN_CONFIG).is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG), resolve=False)
    return cfg if isinstance(cfg, dict) else {}


def _saved_model_info(metadata) -> tuple[int, "torch.dtype"]:
    """(padded vocabulary rows, parameter dtype) of the saved model."""
    entry = metadata.state_dict_metadata.get("embedding.word_embeddings.weight")
    if entry is None or not hasattr(entry, "size"):
        raise CheckpointError("the checkpoint holds no model embedding "
                              "(embedding.word_embeddings.weight): not a policy checkpoint")
    return int(entry.size[0]), entry.properties.dtype


def _model_keys(model_sd: dict) -> dict[str, tuple | None]:
    """Checkpoint key -> global shape (None when not a plain tensor) of a model's sharded state
    dict; megatron's `_extra_state` objects are left out."""
    keys = {}
    for item in model_sd.values():
        name = getattr(item, "key", None)
        if name is not None and "_extra_state" not in name:
            shape = getattr(item, "global_shape", None)
            keys[name] = tuple(shape) if shape is not None else None
    return keys


def _check_model_keys(model_sd: dict, metadata, ckpt: Path, base_model: str) -> None:
    """The checkpoint's model tensors are exactly those of the model built from the base model
    (same names, same global shapes), so a wrong --base-model fails instead of exporting a
    different architecture. Called on every rank (gathers every stage's names)."""
    import torch.distributed as dist

    mine = _model_keys(model_sd)
    stages: list = [None] * dist.get_world_size()
    dist.all_gather_object(stages, sorted(mine))
    wanted = set().union(*stages)
    saved = {k for k in metadata.state_dict_metadata
             if not k.startswith("optimizer.") and "_extra_state" not in k}
    missing = sorted(k for k in mine if k not in saved)
    extra = sorted(saved - wanted)
    wrong = [f"{k} {tuple(metadata.state_dict_metadata[k].size)} (model: {shape})"
             for k, shape in sorted(mine.items())
             if k in saved and shape is not None
             and tuple(metadata.state_dict_metadata[k].size) != shape]
    if missing or extra or wrong:
        parts = [f"missing {', '.join(missing[:8])}" if missing else "",
                 f"not in the model: {', '.join(extra[:8])}" if extra else "",
                 f"shapes differ: {', '.join(wrong[:8])}" if wrong else ""]
        raise CheckpointError(f"checkpoint {ckpt} does not match the base model {base_model}: "
                              + "; ".join(p for p in parts if p)
                              + " (pass --base-model with the model the run trained)")


# ---------------------------------------------------------------------------- the export
def export_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str,
                      tokenizer_dir: str = "", dtype: str = "auto",
                      max_shard_bytes: int = 5 * 10**9, tp: int = 1, pp: int = 1,
                      progress: bool = True) -> dict:
    """Writes checkpoint `ckpt` as an HF model directory `out_dir` (called on every rank of an
    initialized torch.distributed world; tp * pp must divide the world size).

    base_model: the HF directory the run started from (config, tokenizer, generation config).
    dtype: "auto" (the trained parameters' dtype), "bfloat16" or "float32".
    Returns (on every rank) {"out_dir", "files", "bytes", "seconds", "peak_rss_mib"}; files and
    bytes are filled on rank 0.
    """
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from ctpo_megatron.actor.checkpoint import load_model_weights
    from ctpo_megatron.actor.config import ActorConfig
    from ctpo_megatron.actor.policy import build_policy_model
    from ctpo_megatron.models.hf_io import _is_tied_copy, export_hf_checkpoint
    from ctpo_megatron.models.weight_map import build_param_maps
    from ctpo_megatron.parallel.dims import ParallelDims

    start = time.monotonic()
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
    metadata = check_checkpoint_files(ckpt)
    padded_vocab, saved_dtype = _saved_model_info(metadata)
    if saved_dtype not in (torch.float32, torch.bfloat16):
        raise CheckpointError(f"checkpoint {ckpt}: parameters are {saved_dtype}, expected float32 "
                              "or bfloat16")
    if padded_vocab % tp:
        raise CheckpointError(f"the checkpoint's padded vocabulary ({padded_vocab} rows) does not "
                              f"split over tp={tp}; choose --tp dividing {padded_vocab}")
    # The rows past the real vocabulary are padding; pad to exactly the saved count at any TP.
    cfg = ActorConfig(hf_model_dir=base_model, dims=ParallelDims(tp=tp, pp=pp),
                      params_dtype="bfloat16" if saved_dtype == torch.bfloat16 else "float32",
                      make_vocab_size_divisible_by=padded_vocab // tp,
                      # weights only: no attention runs, so the local spec is fine on a GPU too
                      allow_local_spec=True,
                      transformer_overrides={"perform_initialization": False})
    model, spec, _, pgs, _ = build_policy_model(cfg, load_hf_weights=False)
    _check_model_keys(model.sharded_state_dict(), metadata, ckpt, base_model)
    load_model_weights(model, ckpt)
    out_dtype = saved_dtype if dtype == "auto" else getattr(torch, DTYPES[dtype])

    # Progress total: bytes of the HF tensors of every stage (a tied lm_head is written once).
    local = sum(torch.Size(shape).numel() for pmap in build_param_maps(model, spec, pgs.tp.size())
                if not (_is_tied_copy(spec, pmap.megatron_name) and pgs.pp.rank() != 0)
                for shape in pmap.hf_shapes)
    total = torch.tensor([local], dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(total, group=pgs.pp)
    total_bytes = int(total.item()) * out_dtype.itemsize

    rank = dist.get_rank()
    tmp = out_dir.parent / (out_dir.name + ".incomplete")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"export {out_dir.name}",
               disable=not progress or rank != 0, file=sys.stderr)
    written = {"bytes": 0}

    def on_tensor(_name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        written["bytes"] += nbytes
        bar.update(nbytes)

    export_hf_checkpoint(model, pgs, tmp, base_model, dtype=out_dtype,
                         max_shard_bytes=max_shard_bytes, on_tensor=on_tensor)
    bar.close()
    files: list[str] = []
    if rank == 0:
        _finish_directory(tmp, base_model, tokenizer_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        files = sorted(p.name for p in out_dir.iterdir())
    dist.barrier()
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if rank == 0:
        logger.info("exported %s -> %s: %.1f MB of %s weights in %.1fs (peak RSS of rank 0: "
                    "%.0f MiB)", ckpt, out_dir, written["bytes"] / 1e6,
                    str(out_dtype).removeprefix("torch."), seconds, peak)
    return {"out_dir": str(out_dir), "files": files, "bytes": written["bytes"],
            "seconds": seconds, "peak_rss_mib": peak}


def _finish_directory(out: Path, base_model: str, tokenizer_dir: str) -> None:
    """Tokenizer files from a separate tokenizer directory, and a generation_config.json when
    the base model has none (transformers and SGLang read sampling defaults from it)."""
    if tokenizer_dir and Path(tokenizer_dir).resolve() != Path(base_model).resolve():
        for src in Path(tokenizer_dir).iterdir():
            if src.is_file() and _TOKENIZER_FILES.match(src.name):
                shutil.copy2(src, out / src.name)
    if not any(_TOKENIZER_FILES.match(p.name) for p in out.iterdir()):
        logger.warning("no tokenizer files in %s: serving engines need one (pass --tokenizer DIR)",
                       tokenizer_dir or base_model)
    if not (out / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctpo_megatron.export", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="run directory, checkpoint root (holding `latest`) or iter_* directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face model directory to write")
    parser.add_argument("--step", type=int, default=None,
                        help="export the checkpoint of this step instead of `latest`")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32", "bfloat16", "float32"),
                        default="auto", help="dtype of the written weights; auto: the trained "
                        "parameters' dtype (default: %(default)s)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    parser.add_argument("--base-model", default="", metavar="DIR",
                        help="HF directory the run started from (config, tokenizer); default: "
                        "model.path in the run's config.yaml")
    parser.add_argument("--tokenizer", default="", metavar="DIR", help="tokenizer directory; default: "
                        "model.tokenizer_path in config.yaml, else the base model's files")
    parser.add_argument("--tp", type=int, default=0, help="tensor-parallel size of the export "
                        "(default: the training layout if the world size matches it, else the "
                        "world size)")
    parser.add_argument("--pp", type=int, default=0, help="pipeline-parallel size of the export "
                        "(default: see --tp, else 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _layout(args: argparse.Namespace, run_cfg: dict, world_size: int) -> tuple[int, int]:
    saved = run_cfg.get("parallel") or {}
    tp, pp = args.tp, args.pp
    if not tp and not pp:
        if saved.get("tp", 1) * saved.get("pp", 1) == world_size:
            return int(saved.get("tp", 1)), int(saved.get("pp", 1))
        return world_size, 1
    pp = pp or 1
    return tp or max(world_size // pp, 1), pp


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        # Cheap checks first: before process groups, so every rank fails the same way at once.
        ckpt, run_dir = resolve_checkpoint(args.checkpoint, args.step)
        check_checkpoint_files(ckpt)
        run_cfg = read_run_config(run_dir)
        model_cfg = run_cfg.get("model") or {}
        base = args.base_model or model_cfg.get("path") or ""
        if not base:
            raise CheckpointError(f"cannot tell the base model of {ckpt}: no {RUN_CONFIG} with "
                                  "model.path above it; pass --base-model DIR")
        if not (Path(base) / "config.json").is_file():
            raise CheckpointError(f"base model {base} has no config.json (from "
                                  f"{'--base-model' if args.base_model else RUN_CONFIG}; pass "
                                  "--base-model if the run's files moved)")
        out = out_dir.resolve()
        for what, path in (("the checkpoint", ckpt), ("the base model", Path(base))):
            path = path.resolve()
            if out == path or out in path.parents or path in out.parents:
                raise CheckpointError(f"OUT_DIR {out_dir} overlaps {what} {path}: choose another "
                                      "directory (it is replaced as a whole)")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
            raise CheckpointError(f"{out_dir} exists and is not empty (pass --overwrite)")
    except CheckpointError as e:
        print(f"python -m ctpo_megatron.export: error: {e}", file=sys.stderr)
        return 2

    from ctpo_megatron.logging_utils import init_logging
    from ctpo_megatron.parallel import destroy_parallel, init_distributed

    rank, world_size = init_distributed()
    init_logging(rank)
    tp, pp = _layout(args, run_cfg, world_size)
    try:
        logger.info("exporting %s (base model %s) at tp %d x pp %d on %d ranks", ckpt, base, tp,
                    pp, world_size)
        export_checkpoint(ckpt, out_dir, base_model=base,
                          tokenizer_dir=args.tokenizer or model_cfg.get("tokenizer_path") or "",
                          dtype=args.dtype, max_shard_bytes=args.max_shard_size, tp=tp, pp=pp,
                          progress=not args.no_progress)
        if rank == 0:
            print(out_dir)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
