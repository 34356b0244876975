"""Embedded CPU inference server speaking SGLang 0.5.23's native HTTP API subset.

Run: `python -m ctpo_megatron.rollout.serving.server --model DIR --port P`. See docs/rollout_servers.md.
"""

from ctpo_megatron.rollout.serving.server.app import ServerState, build_app, make_state

__all__ = ["ServerState", "build_app", "make_state"]
