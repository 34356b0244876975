"""Prompt sets, the resumable sampler, the synthetic task, tiny tokenizer/model, warm start."""

import json
import random

import pytest
import torch

from ctpo_megatron.data import arithmetic
from ctpo_megatron.data.prompts import PromptSampler, load_prompts, write_rows
from ctpo_megatron.data.tiny_model import TinyModelConfig, build_tiny_model
from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer
from ctpo_megatron.data.warm_start import encode_demo, sft


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_char_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_arithmetic_rows_are_correct_and_disjoint():
    train = arithmetic.make_rows(300, seed=1, split="train")
    held = arithmetic.make_rows(50, seed=2, split="test",
                                exclude={r["extra_info"]["expression"] for r in train})
    for row in train + held:
        expr = row["extra_info"]["expression"]
        assert row["prompt"] == [{"role": "user", "content": f"What is {expr}?"}]
        a, rest = expr.split("*")
        op = "+" if "+" in rest else "-"
        b, c = rest.split(op)
        value = int(a) * int(b) + (int(c) if op == "+" else -int(c))
        assert row["reward_model"]["ground_truth"] == str(value)
    assert not {r["extra_info"]["expression"] for r in train} & {r["extra_info"]["expression"] for r in held}
    assert len({r["extra_info"]["expression"] for r in train}) == 300
    assert arithmetic.make_rows(5, seed=1, split="train") == train[:5]  # seeded


def test_wrong_guess_is_wrong():
    rng = random.Random(0)
    assert all(arithmetic.wrong_guess(rng, v) != v for v in range(100, 10000, 37))


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_verl_style_rows_load(tmp_path, ext):
    rows = arithmetic.make_rows(7, seed=3, split="train")
    path = write_rows(rows, str(tmp_path / f"train.{ext}"))
    prompts = load_prompts([path])
    assert len(prompts) == 7
    assert prompts[2].messages == rows[2]["prompt"]
    assert prompts[2].ground_truth == rows[2]["reward_model"]["ground_truth"]
    assert prompts[2].data_source == "tiny_arith"
    assert prompts[2].uid == f"{path}#2"


def test_plain_string_prompt_and_custom_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": 2}) + "\n")
    [p] = load_prompts([str(path)], prompt_key="question", ground_truth_key="answer", data_source_key="")
    assert p.messages == [{"role": "user", "content": "1+1?"}] and p.ground_truth == "2"


def test_bad_rows_name_file_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl row 0: no field 'reward_model.ground_truth'"):
        load_prompts([str(path)])
    path.write_text(json.dumps({"prompt": 3, "reward_model": {"ground_truth": "1"}}) + "\n")
    with pytest.raises(ValueError, match="field 'prompt' must be a string or a non-empty list"):
        load_prompts([str(path)])
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: not a JSON object"):
        load_prompts([str(path)])


def test_sampler_resume_draws_the_same_prompts(tmp_path):
    rows = arithmetic.make_rows(10, seed=4, split="train")
    prompts = load_prompts([write_rows(rows, str(tmp_path / "t.jsonl"))])
    full = PromptSampler(prompts, seed=5)
    expected = [[p.uid for p in full.next_batch(4)] for _ in range(6)]  # crosses 2 epochs
    first = PromptSampler(prompts, seed=5)
    got = [[p.uid for p in first.next_batch(4)] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PromptSampler(prompts, seed=5)
    resumed.load_state_dict(state)
    got += [[p.uid for p in resumed.next_batch(4)] for _ in range(3)]
    assert got == expected
    epoch0 = [u for b in expected for u in b][:10]
    assert sorted(epoch0) == sorted(p.uid for p in prompts)  # an epoch is a permutation
    with pytest.raises(ValueError, match="checkpoint was taken on 10 training prompts"):
        PromptSampler(prompts[:5], seed=5).load_state_dict(state)


def test_char_tokenizer_reloads_identically_next_to_a_qwen2_model(tokenizer, tmp_path):
    # AutoTokenizer loads a Qwen2 model's tokenizer as Qwen2Tokenizer (byte-level pre-tokenizer);
    # the ids must not change, or rollouts and warm start would see different tokens.
    from transformers import AutoTokenizer

    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nWhat is 37*12-5?\t~{}<|im_end|>\n```python\nprint(1)\n```\n\\boxed{439}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.decode(ids) == text
    assert len(ids) == len(text) - len("<|im_start|>") - len("<|im_end|>") + 2  # one token per char


def test_char_tokenizer_round_trip(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 37*12-5?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) <= 128
    body = "```python\nprint(37*12-5)\n```"
    assert len(tokenizer(body, add_special_tokens=False)["input_ids"]) == len(body)


def test_tiny_model_and_warm_start_reduce_loss(tokenizer):
    model = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert model.config.vocab_size == 128 and model.config.num_hidden_layers == 2
    rng = random.Random(0)
    demos = []
    for row in arithmetic.make_rows(16, seed=6, split="sft"):
        segs = [(arithmetic.code_turn(row["extra_info"]["expression"]), True),
                ("\n```output\n1\n```\n", False), (arithmetic.answer_turn("1"), True)]
        demos.append(encode_demo(tokenizer, row["prompt"], segs))
    ids, mask = demos[0]
    assert len(ids) == len(mask) and mask[-1] == 1 and ids[-1] == tokenizer.eos_token_id
    assert 0 < sum(mask) < len(mask)
    torch.manual_seed(0)
    losses = sft(model, demos, steps=30, batch_size=8, lr=3e-3, seed=rng.randrange(100),
                 pad_id=tokenizer.pad_token_id)
    assert losses[-1] < 0.5 * losses[0]
