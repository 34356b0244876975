"""`python -m ctpo_megatron.rollout.agent`: one tool-interleaved rollout against a server."""
from ctpo_megatron.rollout.agent.loop import main

if __name__ == "__main__":
    main()
