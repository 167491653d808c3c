"""Variance-preserving identities: ε/v/x conversions, the sigmoid-weight crossover."""

import pytest
import torch

from ul_fast import ops
from ul_fast.diffusion import eps_from_v, sigmoid_crossover, v_target, x_from_eps, x_from_v


def test_conversions_round_trip_and_match_the_vdm_identity():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 3, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, generator=g,
                                                                                 dtype=torch.float64)
    logsnr = torch.tensor([-8.0, -1.0, 0.0, 2.5, 9.0], dtype=torch.float64)
    alpha, sigma = (c[:, None, None].double() for c in ops.alpha_sigma(logsnr))
    x_t = alpha * x + sigma * eps
    v = v_target(x, eps, logsnr)
    torch.testing.assert_close(v, alpha * eps - sigma * x)
    torch.testing.assert_close(x_from_v(x_t, v, logsnr), x)
    torch.testing.assert_close(eps_from_v(x_t, v, logsnr), eps)
    torch.testing.assert_close(x_from_eps(x_t, eps, logsnr), x)
    # e^λ·‖x − x̂‖² = ‖ε − ε̂‖² for any prediction
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    x_err = (x - x_from_v(x_t, v_hat, logsnr)).square().sum((1, 2))
    eps_err = (eps - eps_from_v(x_t, v_hat, logsnr)).square().sum((1, 2))
    # α, σ come from fp32 (ops.alpha_sigma); at λ = 9 the e^λ factor magnifies their rounding to ~1e-5.
    torch.testing.assert_close(logsnr.exp() * x_err, eps_err, rtol=5e-5, atol=0)


@pytest.mark.parametrize("loss_factor,bias", [(1.5, 0.0), (3.0, -1.0), (1.1, 2.0)])
def test_sigmoid_crossover(loss_factor, bias):
    lam = sigmoid_crossover(loss_factor, bias)
    assert loss_factor * torch.sigmoid(torch.tensor(bias - lam)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss_factor > 1"):
        sigmoid_crossover(1.0, bias)
