import math

import torch

from space.distributions import bernoulli_kl, normal_kl, normal_log_prob, relaxed_bernoulli_logit_sample


def test_bernoulli_kl_by_hand():
    q = torch.tensor([0.5, 0.9, 0.1])
    kl = bernoulli_kl(q, 0.1)
    # q = 0.5: 0.5 ln(0.5/0.1) + 0.5 ln(0.5/0.9) = 0.5 ln 5 + 0.5 ln(5/9) = 0.5107
    expected0 = 0.5 * math.log(5) + 0.5 * math.log(5 / 9)
    # q = 0.9: 0.9 ln 9 + 0.1 ln(0.1/0.9) = 0.8 ln 9 = 1.7578
    expected1 = 0.8 * math.log(9)
    assert torch.allclose(kl, torch.tensor([expected0, expected1, 0.0]), atol=1e-6)
    # the prior 1e-10 of atari_joint stays finite thanks to the 1e-15 inside the logs
    assert torch.isfinite(bernoulli_kl(q, 1e-10)).all()


def test_normal_kl_and_log_prob_by_hand():
    # KL(N(1, 2) || N(0, 1)) = ln(1/2) + (4 + 1) / 2 - 1/2 = 2 - ln 2
    kl = normal_kl(torch.tensor(1.0), torch.tensor(2.0), 0.0, 1.0)
    assert abs(kl.item() - (2 - math.log(2))) < 1e-6
    # log N(0; 0, 0.7^2) = -ln 0.7 - ln sqrt(2 pi)
    lp = normal_log_prob(torch.zeros(1), torch.zeros(1), 0.7)
    assert abs(lp.item() + math.log(0.7) + 0.5 * math.log(2 * math.pi)) < 1e-6


def test_relaxed_bernoulli_deterministic_is_logits_over_tau_and_samples_vary():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(relaxed_bernoulli_logit_sample(logits, 2.5, True), logits / 2.5)
    a = relaxed_bernoulli_logit_sample(logits, 2.5, False)
    b = relaxed_bernoulli_logit_sample(logits, 2.5, False)
    assert not torch.equal(a, b)
    # the median of the relaxed sample is logits / tau: about half of the samples lie below it
    many = relaxed_bernoulli_logit_sample(logits.expand(20000, 3), 2.5, False)
    below = (many < logits / 2.5).float().mean(0)
    assert torch.allclose(below, torch.full((3,), 0.5), atol=0.02)


def test_relaxed_bernoulli_of_bf16_logits_has_finite_gradients():
    """Under bf16 autocast the presence logits arrive in bf16, where 1 - EPS_PROB is 1: a confident
    cell's p stayed at 1 and log1p(-p) made every gradient NaN, so train.amp: bf16 skipped every step."""
    from space.distributions import relaxed_bernoulli_logit_sample

    logits = torch.tensor([-12.0, 0.0, 12.0, 30.0], dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(0)
    relaxed_bernoulli_logit_sample(logits, 0.5, deterministic=False).sum().backward()
    assert torch.isfinite(logits.grad).all()
