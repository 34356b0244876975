"""The embedded server's model: a Hugging Face causal LM, batched forward with a KV cache, and
in-place weight loading by HF parameter name.

Layout: one process, one device (CPU, or one CUDA device when asked and available); no TP.
"""

from __future__ import annotations

import inspect
import logging
import threading
from pathlib import Path
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BatchState:
    """KV cache and padding of one running batch.

    attention_mask: [B, S] int64 — 1 for real tokens; None while no row is padded (then the
    forward is exactly the model's plain forward, which keeps prefill log-probs bit-equal to a
    trainer's unbatched forward).
    """

    def __init__(self, past_key_values, attention_mask: torch.Tensor | None,
                 next_position: torch.Tensor):
        self.past_key_values = past_key_values
        self.attention_mask = attention_mask
        self.next_position = next_position  # [B] int64 — position id of the next token per row


class ModelRunner:
    """Holds the model; every forward and weight write happens under `lock`."""

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str = "cpu",
                 seed: int = 0):
        from transformers import AutoConfig, AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} was asked for but CUDA is not available")
        torch.manual_seed(seed)
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.lock = threading.RLock()
        self.vocab_size = int(self.config.vocab_size)
        self.context_length = int(getattr(self.config, "max_position_embeddings", 32768))
        self.eos_token_ids = self._eos_ids()
        # Tied embeddings appear under both names in state_dict(keep_vars=True): an update to
        # either name writes the one shared tensor, as SGLang's loaders do.
        self._named = dict(self.model.state_dict(keep_vars=True))
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns).
        params = inspect.signature(self.model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._released_shapes: dict[int, torch.Size] | None = None
        """While the weights are released: parameter id -> its shape (None: weights held)."""

    def _eos_ids(self) -> frozenset[int]:
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = getattr(self.config, "eos_token_id", None)
        if ids is None:
            return frozenset()
        return frozenset([ids] if isinstance(ids, int) else ids)

    # ---- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sequences: list[list[int]], all_logits: bool = False
                ) -> tuple[torch.Tensor, BatchState, list[int]]:
        """Runs the prompts of a batch; returns (logits, state, left_pad).

        logits: [B, S, V] float32 with `all_logits` (every position; left-padded rows start with
        their padding), else [B, 1, V] (last position only, saves the [B, S, V] buffer).
        """
        keep = 0 if all_logits else 1
        lengths = [len(s) for s in sequences]
        longest = max(lengths)
        pads = [longest - n for n in lengths]
        ids = torch.zeros(len(sequences), longest, dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, pads[i]:] = torch.tensor(seq, dtype=torch.long)
        ids = ids.to(self.device)
        if any(pads):
            mask = (torch.arange(longest)[None, :] >= torch.tensor(pads)[:, None]).long().to(self.device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=keep)
        else:
            mask = None
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep)
        next_pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return out.logits.float(), BatchState(self._cache_of(out), mask, next_pos), pads

    def _cache_of(self, out):
        return getattr(out, self._cache_key)

    @torch.inference_mode()
    def decode(self, tokens: list[int], state: BatchState) -> torch.Tensor:
        """One decode step for every row; returns logits [B, V] float32 and advances `state`."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        kwargs = {self._cache_key: state.past_key_values, "use_cache": True, "logits_to_keep": 1}
        if state.attention_mask is None:
            out = self.model(input_ids=ids, **kwargs)
        else:
            state.attention_mask = torch.cat(
                [state.attention_mask, state.attention_mask.new_ones(len(tokens), 1)], dim=1)
            out = self.model(input_ids=ids, attention_mask=state.attention_mask,
                             position_ids=state.next_position[:, None], **kwargs)
        state.past_key_values = self._cache_of(out)
        state.next_position = state.next_position + 1
        return out.logits[:, -1, :].float()

    def select_rows(self, state: BatchState, keep: list[int]) -> None:
        """Drops finished rows from a running batch (KV cache, mask, positions) in place."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        state.past_key_values.batch_select_indices(idx)
        if state.attention_mask is not None:
            state.attention_mask = state.attention_mask[idx]
        state.next_position = state.next_position[idx]

    # ---- weights -------------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        return list(self._named)

    def parameter(self, name: str) -> torch.Tensor:
        if name not in self._named:
            raise KeyError(f"parameter {name!r} is not in the model ({len(self._named)} names, "
                           f"e.g. {next(iter(self._named))!r})")
        return self._named[name]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copies full HF-named tensors into the model in place; returns how many were loaded.

        Raises KeyError for an unknown name and ValueError for a shape mismatch (before writing
        that tensor). dtype is converted to the model's.
        """
        count = 0
        with self.lock:
            if self.weights_released:
                raise RuntimeError("the weights are released (release_memory_occupation): call "
                                   "resume_memory_occupation with tag 'weights' before updating them")
            for name, tensor in named_tensors:
                target = self.parameter(name)
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r}: got shape {tuple(tensor.shape)}, the model "
                                     f"has {tuple(target.shape)}")
                target.copy_(tensor)
                count += 1
        return count

    # ---- memory occupation (SGLang's release / resume of the "weights" region) -------------
    @property
    def weights_released(self) -> bool:
        return self._released_shapes is not None

    def weight_bytes(self) -> int:
        """Bytes the parameters hold now (tied ones once); 0 while released."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def release_weights(self) -> None:
        """Frees every parameter's storage (each becomes an empty tensor of its dtype), as
        SGLang's memory saver unmaps the weights; buffers (rotary tables) stay, as SGLang
        stashes and restores them. Idempotent."""
        with self.lock:
            if self._released_shapes is not None:
                return
            self._released_shapes = {}
            for param in self.model.parameters():
                self._released_shapes[id(param)] = param.shape
                param.data = torch.empty(0, dtype=param.dtype, device=self.device)

    @torch.no_grad()
    def resume_weights(self) -> None:
        """Allocates the parameters again. Like SGLang's resume (without a CPU backup) the
        values are not restored: they are NaN here, so only a weight update makes the model
        usable again and a generation before one cannot pass unnoticed."""
        with self.lock:
            if self._released_shapes is None:
                return
            for param in self.model.parameters():
                param.data = torch.full(self._released_shapes[id(param)], float("nan"),
                                        dtype=param.dtype, device=self.device)
            self._released_shapes = None

    def load_from_disk(self, model_path: str) -> int:
        """Loads every `*.safetensors` file of an HF checkpoint directory (or one file)."""
        from safetensors.torch import load_file

        path = Path(model_path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no safetensors weights found at {model_path}")
        total = 0
        for file in files:
            total += self.load_weights(load_file(str(file)).items())
        return total
