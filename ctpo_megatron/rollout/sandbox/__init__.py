"""Isolated execution of model-written Python code (tool calls of the agent loop).

    from ctpo_megatron.rollout.sandbox import run_code
    result = run_code("print(6 * 7)", timeout=10.0)   # result.stdout == "42\\n"

See `runner.run_code` for the isolation model and `SandboxConfig` for the limits.
"""

from ctpo_megatron.rollout.sandbox.config import SandboxConfig, SandboxResult, SandboxSetupError
from ctpo_megatron.rollout.sandbox.pool import SandboxPool
from ctpo_megatron.rollout.sandbox.runner import run_code

__all__ = ["SandboxConfig", "SandboxPool", "SandboxResult", "SandboxSetupError", "run_code"]
