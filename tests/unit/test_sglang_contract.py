"""Our payloads against SGLang 0.5.23's own request validator (`api_types.py`, loaded by path),
and the fallback mirror against that validator on a table of good and bad bodies."""

import pytest

from ctpo_megatron.rollout.serving import contract
from ctpo_megatron.rollout.serving.client import SGLangClient
from ctpo_megatron.rollout.serving.contract import (SAMPLING_PARAM_KEYS, ContractError, FallbackContract,
                                            load_contract, validate_generate_request)

RL_SAMPLING = [
    {},
    {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "top_k": -1},
    {"max_new_tokens": 8, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
     "stop_token_ids": [1, 2], "ignore_eos": False, "skip_special_tokens": False,
     "no_stop_trim": True, "sampling_seed": 1234, "n": 1},
    {"max_new_tokens": None, "temperature": None},
]

BODIES = [  # (body, valid)
    ({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}, True),
    ({"input_ids": [[1, 2], [3]], "sampling_params": [{"n": 2}, {"n": 2}]}, True),
    ({"input_ids": [1], "return_logprob": [True, False], "logprob_start_len": 0, "stream": True}, True),
    ({"input_ids": [1], "unknown_top_level": 1}, True),  # top-level unknown keys are ignored
    ({"input_ids": [1], "sampling_params": {"seed": 1}}, False),
    ({"input_ids": [1], "sampling_params": {"temperature": "1"}}, False),
    ({"input_ids": [1], "sampling_params": {"top_k": 1.5}}, False),
    ({"input_ids": [1], "sampling_params": {"ignore_eos": 1}}, False),
    ({"input_ids": [1], "sampling_params": {"stop_token_ids": [1.0]}}, False),
    ({"input_ids": [1.0]}, False),
    ({"input_ids": [1], "stream": 1}, False),
    ({"input_ids": [1], "return_logprob": "yes"}, False),
    ({"input_ids": [1], "rid": 5}, False),
]


def _error(fn, body):
    try:
        fn(body)
    except ContractError as e:
        return str(e)
    return None


def test_contract_file_loads_and_lists_the_same_sampling_keys():
    api = load_contract()
    assert tuple(api.SamplingParams.__struct_fields__) == SAMPLING_PARAM_KEYS


@pytest.mark.parametrize("params", RL_SAMPLING)
def test_every_client_payload_passes_sglangs_validator(params):
    api = load_contract()
    for return_logprob in (True, False):
        body = SGLangClient.build_generate_body([3, 1, 4], params, return_logprob=return_logprob)
        api.GenerateRequest.from_json_value(body)  # raises JsonContractError on any drift
        validate_generate_request(body)


@pytest.mark.parametrize("body, valid", BODIES)
def test_fallback_agrees_with_sglang(body, valid):
    api = load_contract()

    def real(b):
        try:
            api.GenerateRequest.from_json_value(b)
        except api.JsonContractError as e:
            raise ContractError(str(e)) from None

    real_error = _error(real, body)
    assert (real_error is None) == valid
    fallback_error = _error(FallbackContract.check_generate, body)
    assert fallback_error == real_error  # same verdict, same message


def test_env_var_points_at_the_contract(tmp_path, monkeypatch):
    monkeypatch.setenv(contract.CONTRACT_ENV, str(tmp_path / "missing.py"))
    assert not contract.contract_available()
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_contract()
    # Without the file the fallback still rejects unknown keys with SGLang's message.
    with pytest.raises(ContractError, match="unknown field `seed`"):
        validate_generate_request({"input_ids": [1], "sampling_params": {"seed": 1}})


_SGLANG_DECODE = """
import sys
sys.path.insert(0, sys.argv[1])
from sglang_serializer import MultiprocessingSerializer  # SGLang's own code, from its wheel
entries = sys.stdin.read().split()
for rank, entry in enumerate(entries):  # each TP rank decodes its own entry
    for name, t in MultiprocessingSerializer.deserialize(entry):
        print(rank, name, str(t.dtype), list(t.shape), float(t.double().sum()))
"""


def test_tensor_payloads_decode_with_sglangs_own_serializer():
    """The `tensor` transport's entries, decoded in another process by SGLang 0.5.23's
    MultiprocessingSerializer and its SafeUnpickler (taken from the wheel), one per TP rank."""
    import subprocess
    import sys

    import torch

    from ctpo_megatron.rollout.weight_sync import WeightSyncConfig
    from ctpo_megatron.rollout.weight_sync.tensor import sglang_entries

    assert WeightSyncConfig().tensor_encoding == "sglang"  # the default is the real format
    serializer = contract.contract_path().parent / "sglang_serializer.py"
    assert serializer.is_file(), "run scripts/setup_env.sh (it extracts SGLang's serializer)"
    bucket = [("model.layers.0.mlp.up_proj.weight", torch.randn(8, 4)),
              ("lm_head.weight", torch.randn(5, 4).to(torch.bfloat16))]
    entries, staged = sglang_entries(bucket, tp_size=2)
    assert len(entries) == 2  # one payload per rank, each pickled on its own
    proc = subprocess.run([sys.executable, "-c", _SGLANG_DECODE, str(serializer.parent)],
                          input=" ".join(entries), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"{rank} {name} {t.dtype} {list(t.shape)} {float(t.double().sum())}"
                for rank in range(2) for name, t in bucket]
    assert proc.stdout.split("\n")[:-1] == expected
    del staged


def test_safetensors_entries_are_refused_by_sglangs_decoder():
    """Why configs for SGLang must not use the embedded-only encoding: SGLang cannot read it."""
    import importlib.util

    import torch

    from ctpo_megatron.rollout.weight_sync.tensor import encode_safetensors

    path = contract.contract_path().parent / "sglang_serializer.py"
    spec = importlib.util.spec_from_file_location("_sglang_serializer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Exception):
        module.MultiprocessingSerializer.deserialize(encode_safetensors([("w", torch.ones(2))]))
