"""The paper's claims about the cumulative-token ratio, checked by exact enumeration.

A tabular autoregressive policy over a vocabulary of 3 tokens and horizon 4 (81 trajectories,
one softmax per prefix node) plays the current policy pi (parameters theta) and the behaviour
policy mu. The advantage A_t is a fixed random function of (prefix, current token). For every
trajectory and position the per-token gradient estimator is read off our registered losses
(`LOSSES[name]`, clipping pushed out of the way) by autograd w.r.t. theta; expectations and
variances under mu are exact probability-weighted sums over all 81 trajectories, not samples.

Claims (t = 1..H):
- CTPO (cumulative ratio pi(y<=t)/mu(y<=t)): E_mu[estimator_t] = on-policy gradient_t exactly.
- Full-sequence ratio: same expectation, variance >= CTPO's at every t, strictly where pi and
  mu differ after t, equal where they do not (t = H, or identical policies after t).
- Per-token (GRPO) ratio: expectation equals the on-policy one at t = 1 only; it differs
  wherever the prefix distributions of pi and mu differ.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ctpo_megatron.algo import LOSSES, PolicyLossConfig

V, H = 3, 4
NO_CLIP = {
    # LA bounds 50*sqrt(n) and dual threshold exp(50 sqrt(n)) never bind at |log ratio| < 10.
    "ctpo": PolicyLossConfig(name="ctpo", la_clip_low=50.0, la_clip_high=50.0, la_clip_c=50.0),
    "seq": PolicyLossConfig(name="seq", adaptive_clip=True, la_clip_low=50.0, la_clip_high=50.0,
                            la_clip_c=50.0),
    "grpo": PolicyLossConfig(name="grpo", clip_ratio_low=1.0, clip_ratio_high=1e9, clip_ratio_c=1e12),
}


class TabularProblem:
    """All trajectories of a depth-H tree policy, with their node indices and advantages."""

    def __init__(self, seed: int, same_after_depth: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.offsets = [sum(V ** k for k in range(d)) for d in range(H + 1)]
        n_nodes = self.offsets[H]
        self.theta_mu = torch.randn(n_nodes, V, generator=g, dtype=torch.float64)
        self.theta_pi = self.theta_mu + 0.5 * torch.randn(n_nodes, V, generator=g, dtype=torch.float64)
        if same_after_depth is not None:  # pi == mu at every decision of depth >= same_after_depth
            start = self.offsets[same_after_depth]
            self.theta_pi[start:] = self.theta_mu[start:]
        advantage_table = torch.randn(n_nodes, V, generator=g, dtype=torch.float64)
        self.tokens = torch.tensor(list(itertools.product(range(V), repeat=H)))  # [B, H]
        nodes = torch.zeros_like(self.tokens)
        for t in range(H):
            code = torch.zeros(len(self.tokens), dtype=torch.long)
            for s in range(t):
                code = code * V + self.tokens[:, s]
            nodes[:, t] = self.offsets[t] + code
        self.nodes = nodes
        self.advantages = advantage_table[nodes, self.tokens]  # [B, H]: A(prefix, y_t)
        self.mask = torch.ones(self.tokens.shape, dtype=torch.float64)

    def log_probs(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(theta, dim=-1)[self.nodes, self.tokens]  # [B, H]

    def trajectory_probs(self, theta: torch.Tensor) -> torch.Tensor:
        return self.log_probs(theta).sum(-1).exp()  # [B]

    def on_policy_gradient(self) -> torch.Tensor:
        """[H, P]: E_pi[A_t grad log pi(y_t | y_<t)] per position (P = parameters)."""
        jac = torch.autograd.functional.jacobian(self.log_probs, self.theta_pi, vectorize=True)
        jac = jac.flatten(2)  # [B, H, P]
        weights = self.trajectory_probs(self.theta_pi)[:, None] * self.advantages
        return torch.einsum("bt,btp->tp", weights, jac)

    def estimator(self, name: str) -> torch.Tensor:
        """[B, H, P]: per-trajectory, per-position gradient estimate -grad_theta l_t of a loss."""
        old = self.log_probs(self.theta_mu)

        def per_token_loss(theta):
            return LOSSES[name](self.log_probs(theta), old, self.advantages, self.mask,
                                NO_CLIP[name]).pg_losses

        cum = torch.cumsum(self.log_probs(self.theta_pi) - old, -1)
        assert cum.abs().max() < 10.0  # the log-ratio cap at 10 must not bind here
        return -torch.autograd.functional.jacobian(per_token_loss, self.theta_pi, vectorize=True).flatten(2)

    def moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact mean [H, P], per-component variance [H, P] and total variance [H] under mu."""
        est = self.estimator(name)
        mu = self.trajectory_probs(self.theta_mu)
        mean = torch.einsum("b,btp->tp", mu, est)
        second = torch.einsum("b,btp->tp", mu, est.square())
        var = second - mean.square()
        return mean, var, var.sum(-1)


@pytest.fixture(scope="module")
def problems():
    return [TabularProblem(seed) for seed in range(3)]


def test_probabilities_are_exact(problems):
    for p in problems:
        for theta in (p.theta_mu, p.theta_pi):
            assert p.trajectory_probs(theta).sum().item() == pytest.approx(1.0, abs=1e-14)


def test_cumulative_ratio_is_unbiased_for_the_token_level_gradient(problems):
    for p in problems:
        target = p.on_policy_gradient()
        mean, _, _ = p.moments("ctpo")
        assert target.abs().max() > 1e-2  # a non-trivial gradient at every seed
        torch.testing.assert_close(mean, target, rtol=0, atol=1e-12)  # exact sums in float64


def test_full_sequence_ratio_is_unbiased_with_higher_variance(problems):
    for p in problems:
        target = p.on_policy_gradient()
        mean_seq, var_seq, total_seq = p.moments("seq")
        _, var_cum, total_cum = p.moments("ctpo")
        torch.testing.assert_close(mean_seq, target, rtol=0, atol=1e-12)
        assert (var_cum <= var_seq + 1e-12).all()  # component by component
        # pi != mu at every depth: strictly lower before the last position, equal at t = H
        assert (total_cum[:-1] < total_seq[:-1] * (1 - 1e-3)).all(), (total_cum, total_seq)
        assert total_cum[-1].item() == pytest.approx(total_seq[-1].item(), rel=1e-12)


def test_variance_gap_vanishes_where_policies_agree_after_t():
    # pi == mu for decisions at depth >= 2, i.e. positions t >= 3: the future ratio after
    # t = 2, 3, 4 is 1, after t = 1 it is not.
    p = TabularProblem(seed=5, same_after_depth=2)
    _, _, total_seq = p.moments("seq")
    _, _, total_cum = p.moments("ctpo")
    assert total_cum[0] < total_seq[0] * (1 - 1e-3)
    torch.testing.assert_close(total_cum[1:], total_seq[1:], rtol=1e-12, atol=0)


def test_per_token_ratio_is_biased_when_prefix_distributions_differ(problems):
    for p in problems:
        target = p.on_policy_gradient()
        mean_grpo, _, _ = p.moments("grpo")
        torch.testing.assert_close(mean_grpo[0], target[0], rtol=0, atol=1e-12)  # same (empty) prefix
        gap = (mean_grpo[1:] - target[1:]).norm(dim=-1)
        assert (gap > 1e-3 * target[1:].norm(dim=-1)).all(), gap
