"""A character-level tokenizer with Qwen's chat special tokens, for tiny local runs and tests.

Built with the `tokenizers` library and saved as a Hugging Face tokenizer directory, so every
consumer (the embedded rollout server, chat templates, the trainer) loads it with
`transformers.AutoTokenizer.from_pretrained(dir)` exactly like a real Qwen tokenizer.
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


def char_vocab() -> list[str]:
    """The ordered vocabulary: special tokens, then printable ASCII and newline/tab."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    return list(SPECIAL_TOKENS) + chars


def build_char_tokenizer(out_dir: str, *, model_max_length: int = 1024):
    """Builds and saves the tokenizer to `out_dir`; returns the `PreTrainedTokenizerFast`.

    Every character is one token (unknown characters map to `<|endoftext|>`), and the special
    tokens are single tokens matched before the character split. Vocabulary size: 103.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(char_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok
