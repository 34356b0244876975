"""A character-level tokenizer with Qwen's chat special tokens, for tiny local runs and tests.

Built with the `tokenizers` library and saved as a Hugging Face tokenizer directory, so every
consumer (the embedded rollout server, chat templates, the trainer) loads it with
`transformers.AutoTokenizer.from_pretrained(dir)` exactly like a real Qwen tokenizer.

It is a byte-level BPE with single-character tokens and no merges: next to a Qwen2 model's
config.json, `AutoTokenizer` loads it as `Qwen2Tokenizer`, which imposes Qwen's byte-level
pre-tokenizer; a byte-level vocabulary gives the same ids either way (a plain character
vocabulary would silently lose spaces and newlines there).
"""

from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen's special tokens: padding / end of text, chat turn start, chat turn end (= eos)."""

# Qwen's chat template, reduced to what the tiny runs use (system/user/assistant/tool turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2 / Qwen byte-level alphabet: printable bytes map to themselves, the others (space,
    # newline, ...) to unused code points starting at U+0100.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def char_vocab() -> list[str]:
    """The ordered vocabulary: special tokens, then printable ASCII, newline and tab, each in
    its byte-level form (space is "Ġ", newline "Ċ")."""
    mapping = _byte_to_unicode()
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    return list(SPECIAL_TOKENS) + [mapping[ord(c)] for c in chars]


def build_char_tokenizer(out_dir: str, *, model_max_length: int = 1024):
    """Builds and saves the tokenizer to `out_dir`; returns the `PreTrainedTokenizerFast`.

    Every printable ASCII character, newline and tab is one token (other characters map to
    `<|endoftext|>`), and the special tokens are single tokens matched before the split.
    Vocabulary size: 100.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(char_vocab())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok
