"""Rollouts: SGLang launcher and HTTP client, the embedded CPU server, weight sync.

This package never imports megatron: the trainer hands it plain `(hf_name, tensor)` pairs.
"""
