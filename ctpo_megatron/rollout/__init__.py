"""Rollouts: `serving` (SGLang launcher and client, API contract, embedded server), `agent`
(conversation loop, chat templates, reward), `sandbox` (model-written code), `weight_sync`.

This package never imports megatron: the trainer hands it plain `(hf_name, tensor)` pairs.
"""
