"""Log-SNR schedules: exact endpoints, derivative, inverse."""

import pytest
import torch

from ul_fast.diffusion import CosineSchedule, InterpolatedCosineSchedule, LinearSchedule, make_schedule

SCHEDULES = {
    "cosine": CosineSchedule(-15.0, 5.0),
    "shifted_cosine": make_schedule("shifted_cosine", -15.0, 15.0, resolution=32, base_resolution=64),
    "shifted_cosine_down": make_schedule("shifted_cosine", -12.0, 9.0, resolution=512, base_resolution=64),
    "interpolated": InterpolatedCosineSchedule(-15.0, 15.0, shift_high_snr=1.4, shift_low_snr=-2.0),
    "linear": LinearSchedule(-15.0, 5.0),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_endpoints_are_exact(name):
    s = SCHEDULES[name]
    ends = s.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends[0].item() == pytest.approx(s.logsnr_max, abs=1e-9)
    assert ends[1].item() == pytest.approx(s.logsnr_min, abs=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_decreasing_and_rate_matches_finite_differences(name):
    s = SCHEDULES[name]
    t = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    h = 1e-6
    numeric = -(s.logsnr(t + h) - s.logsnr(t - h)) / (2 * h)
    analytic = s.neg_dlogsnr_dt(t)
    assert bool((analytic > 0).all())
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_inverse(name):
    s = SCHEDULES[name]
    t = torch.rand(200, dtype=torch.float64)
    torch.testing.assert_close(s.t_of_logsnr(s.logsnr(t)), t, rtol=0, atol=1e-9)


def test_float32_inputs_keep_dtype():
    s = SCHEDULES["cosine"]
    t = torch.rand(5)
    assert s.logsnr(t).dtype == torch.float32 and s.neg_dlogsnr_dt(t).dtype == torch.float32


@pytest.mark.parametrize("bad", [(5.0, 5.0), (6.0, 5.0), (float("nan"), 5.0), (-float("inf"), 5.0)])
def test_bad_endpoints_are_rejected(bad):
    with pytest.raises(ValueError, match="log-SNR|logsnr"):
        CosineSchedule(*bad)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("sigmoid", -15, 5)
    with pytest.raises(ValueError, match="resolution"):
        make_schedule("shifted_cosine", -15, 5)
