"""Real tiny models for agent-loop tests: an in-process token-in/token-out generator over a
Hugging Face causal LM, and a model briefly trained to reproduce tool-using solutions."""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import tempfile
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctpo_megatron.data.tiny_model import TinyModelConfig, build_tiny_model
from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer
from ctpo_megatron.rollout.agent.loop import AgentLoop
from ctpo_megatron.rollout.sandbox import run_code

_KNOWN_PARAMS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                 "skip_special_tokens", "no_stop_trim", "sampling_seed"}


@dataclass
class LocalResult:
    output_ids: list[int]
    output_log_probs: list[float]
    finish_reason: dict | None
    weight_version: str
    prompt_tokens: int
    server_url: str = "in-process"


class TorchGenerator:
    """Samples from `model` with a KV cache. Log-probs follow SGLang: log_softmax(logits / T)
    of the sampled token (raw logits when greedy). Output ids include the stop token."""

    def __init__(self, model, eos_ids: list[int], weight_version: str = "0") -> None:
        self.model = model.eval()
        self.eos_ids = set(eos_ids)
        self.weight_version = weight_version
        self.requests: list[tuple[list[int], dict]] = []
        self._lock = threading.Lock()

    async def generate(self, input_ids: list[int], sampling_params: dict, *,
                       return_logprob: bool = True) -> LocalResult:
        unknown = set(sampling_params) - _KNOWN_PARAMS
        if unknown:
            raise ValueError(f"unknown sampling params {sorted(unknown)}")
        self.requests.append((list(input_ids), dict(sampling_params)))
        return await asyncio.to_thread(self._generate, list(input_ids), sampling_params)

    @torch.no_grad()
    def _generate(self, input_ids: list[int], p: dict) -> LocalResult:
        with self._lock:
            gen = torch.Generator()
            gen.manual_seed(p.get("sampling_seed") or 0)
            stops = set(p.get("stop_token_ids") or []) | self.eos_ids
            temperature, top_k = p.get("temperature", 1.0), p.get("top_k", -1)
            cur = torch.tensor([input_ids])
            past, out, lps, finish = None, [], [], None
            for _ in range(p["max_new_tokens"]):
                o = self.model(input_ids=cur, cache=past, use_cache=True)
                past = o.cache
                logits = o.logits[0, -1].float()
                logp = F.log_softmax(logits / (temperature if temperature >= 1e-6 else 1.0), dim=-1)
                if temperature < 1e-6:
                    tok = int(torch.argmax(logits))
                else:
                    scaled = logits / temperature
                    if top_k > 0:
                        kth = torch.topk(scaled, top_k).values[-1]
                        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                    tok = int(torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=gen))
                out.append(tok)
                lps.append(float(logp[tok]))
                if tok in stops:
                    finish = {"type": "stop", "matched": tok}
                    break
                cur = torch.tensor([[tok]])
            if finish is None:
                finish = {"type": "length", "length": p["max_new_tokens"]}
            return LocalResult(out, lps, finish, self.weight_version, len(input_ids))


def teacher_forced_log_probs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """[R] float32 — log-prob of each response token given everything before it (one forward)."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + response_ids])
        logits = model(input_ids=ids).logits[0].float()
        logp = F.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        return logp.gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


@functools.lru_cache(maxsize=2)
def trained_setup(kind: str = "char"):
    """(tokenizer, model trained on DEMOS, demo (prompt, response, mask) ids, tokenizer dir);
    built once per test process and shared by the agent test modules.

    kind: "char" (the project's char-level tokenizer: the closing fence spans 3 tokens) or
    "bpe" (byte-level BPE with a single "```" token, as in real vocabularies)."""
    tok_dir = tempfile.mkdtemp(prefix="ctpo_agent_tok_")
    atexit.register(shutil.rmtree, tok_dir, True)
    tokenizer = tiny_tokenizer(tok_dir) if kind == "char" else bpe_tokenizer(tok_dir)
    from ctpo_megatron.rollout.agent.config import AgentConfig
    from ctpo_megatron.rollout.sandbox import SandboxPool

    loop = AgentLoop(tokenizer, AgentConfig(temperature=0.0), sandbox=SandboxPool(1))
    examples = [demo_ids(loop, q, pieces) for q, pieces, _ in DEMOS]
    loop.close()
    model = tiny_model(tokenizer)
    train_to_reproduce(model, examples)
    return tokenizer, model, examples, tok_dir


def tiny_tokenizer(tmp_dir: str):
    """The project's char-level Qwen-style tokenizer (every character is one token)."""
    return build_char_tokenizer(tmp_dir)


def bpe_tokenizer(tmp_dir: str | None = None):
    """A byte-level BPE tokenizer (Qwen special tokens, ChatML template) trained on the demos:
    multi-character tokens, and "```" is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ctpo_megatron.data.tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + "\n" + "\n".join(pieces) + "\n```output\n42\n```\n" for q, pieces, _ in DEMOS] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(SPECIAL_TOKENS)))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    if tmp_dir is not None:
        hf.save_pretrained(tmp_dir)
    return hf


def tiny_model(tokenizer, seed: int = 0):
    vocab = (len(tokenizer) + 63) // 64 * 64  # padded like real checkpoints
    cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=128, vocab_size=vocab, max_position_embeddings=512, seed=seed)
    return build_tiny_model(cfg, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


# Each demo: the user question, then assistant text pieces; a piece ending a code block is
# followed by the real sandbox output of that code, inserted exactly as the agent inserts it.
DEMOS = [
    ("What is 6*7?", ["Let me compute.\n```python\nprint(6*7)\n```", "The answer is \\boxed{42}."], "42"),
    ("What is 2**10?", ["```python\nprint(2**10)\n```", "Check:\n```python\nprint(1024 == 2**10)\n```",
                        "So \\boxed{1024}."], "1024"),
    ("What is 1/0?", ["```python\nprint(1/0)\n```", "Undefined: \\boxed{0}."], "\\infty"),
]


def demo_ids(loop: AgentLoop, question: str, pieces: list[str]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, loss mask) of a demo, built with the agent's own formatting."""
    prompt = loop.encode_prompt([{"role": "user", "content": question}])
    resp, mask = [], []
    for k, piece in enumerate(pieces):
        ids = loop.tok.encode(piece)
        resp += ids
        mask += [1] * len(ids)
        call = loop.cfg.tool_format.find_call(piece)
        if call is not None:
            out, _ = loop.tool_output_ids(piece, run_code(call[0], timeout=loop.cfg.tool_timeout_s))
            resp += out
            mask += [0] * len(out)
    end = loop.tok.encode(loop.cfg.chat.im_end)
    return prompt, resp + end, mask + [1] * len(end)


def train_to_reproduce(model, examples: list[tuple[list[int], list[int], list[int]]], steps: int = 200,
                       lr: float = 1e-2) -> float:
    """Fits `model` to the demos' generated tokens (full-batch AdamW); returns the last loss."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    width = max(len(p) + len(r) for p, r, _ in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    weight = torch.zeros(len(examples), width)
    for b, (p, r, m) in enumerate(examples):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        weight[b, len(p):len(p) + len(r)] = torch.tensor(m, dtype=torch.float)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * weight[:, 1:].reshape(-1)).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())
