"""Generators for the rollout producer's tests, built in its spawned child by name: light stand-ins
for `RolloutGenerator` (no servers), so the tests exercise the process machinery itself."""

import os
import time

from ctpo_megatron.rollout.agent.trajectory import Trajectory
from ctpo_megatron.trainer.sampling import fill_informative_groups


def _traj(prompt_index: int, sample_index: int, reward: float) -> Trajectory:
    return Trajectory(prompt_ids=[1, 2, 3], response_ids=[4, 5], loss_mask=[1, 1], rollout_log_probs=[-0.5, -0.5],
                      reward=reward, correct=reward > 0, has_boxed=True, prompt_index=prompt_index,
                      sample_index=sample_index, tool_calls=0, tool_errors=0, tool_timeouts=0, num_turns=1,
                      finish_reason="stop", weight_versions=["step_0"])


class Recording:
    """Marks each step it starts with a file `started_<step>` in the run directory; its result is
    `[f"traj of step {step}"]`. With dynamic sampling on, it over-samples like the real one:
    prompts whose row index is a multiple of 3 get all-equal rewards (dropped)."""

    def __init__(self, spec):
        self.cfg = spec.config
        self.requests = 0

    def generate_step(self, step, prompts, sampler):
        open(os.path.join(self.cfg.trainer.run_dir, f"started_{step}"), "w").close()
        self.requests += 1
        if not self.cfg.rollout.filter_zero_variance_groups:
            return [f"traj of step {step}"], [], {}

        def generate(batch, round_index):
            return [_traj(i, k, float(k % 2) if int(p.uid.rsplit("#", 1)[1]) % 3 else 1.0)
                    for i, p in enumerate(batch) for k in range(2)]

        return fill_informative_groups(generate, sampler, prompts, target=self.cfg.trainer.prompts_per_step,
                                       max_rounds=8)

    def take_stats(self):
        out, self.requests = {"requests": self.requests}, 0
        return out

    def close(self):
        pass


class FailsAtStep2(Recording):
    def generate_step(self, step, prompts, sampler):
        if step == 2:
            raise OSError("server gone")
        return super().generate_step(step, prompts, sampler)


class DiesAtStep2(Recording):
    def generate_step(self, step, prompts, sampler):
        if step == 2:
            os._exit(3)
        return super().generate_step(step, prompts, sampler)


class Hangs(Recording):
    def generate_step(self, step, prompts, sampler):
        super().generate_step(step, prompts, sampler)
        time.sleep(3600)


def recording(spec):
    return Recording(spec)


def fails_at_step_2(spec):
    return FailsAtStep2(spec)


def dies_at_step_2(spec):
    return DiesAtStep2(spec)


def hangs(spec):
    return Hangs(spec)
