"""Single-stage variant (paper App. B): base model trained jointly up to a truncated-logistic log-SNR."""

import pytest
import torch

from ul_fast.config import ConfigError
from ul_fast.diffusion import truncated_logistic
from ul_fast.model import UnifiedLatents
from ul_fast.train import Trainer
from ul_fast.train.metrics_log import read_metrics

from micro import micro_config


def test_truncated_logistic_has_the_sigmoid_survival_function():
    g = torch.Generator().manual_seed(0)
    loc, upper = 0.5, 5.0
    draws = truncated_logistic(200000, loc, upper, "cpu", g).double()
    assert draws.max() <= upper
    for lam in (-4.0, -1.0, 0.5, 2.0, 4.5):
        survival = (draws >= lam).double().mean()
        expected = (torch.sigmoid(torch.tensor(loc - lam)) - torch.sigmoid(torch.tensor(loc - upper))) / \
            torch.sigmoid(torch.tensor(upper - loc))
        assert survival.item() == pytest.approx(expected.item(), abs=4e-3)


def test_single_stage_model_has_no_prior_and_a_latent_conditioned_decoder():
    model = UnifiedLatents(micro_config(model={"mode": "single_stage"}, train={"stage2_steps": 0}).model)
    assert model.prior is None and model.decoder.latent_logsnr_embedding is not None
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    out = model.stage1_loss(x, labels=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"].detach(), out["prior_nats"] + out["decoder_loss"])
    out["loss"].backward()
    for name in ("encoder", "base", "decoder"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    with pytest.raises(ValueError, match="latent_logsnr"):
        model.decoder(x, torch.zeros(4), torch.zeros(4, *model.latent_shape))
    with pytest.raises(ValueError, match="no separate prior"):
        model.sample_latents(2, steps=2, use_prior=True)


def test_single_stage_rejects_a_second_stage():
    with pytest.raises(ConfigError, match="stage2_steps"):
        micro_config(model={"mode": "single_stage"}, train={"stage2_steps": 5})


def test_single_stage_training_runs_and_samples(tmp_path):
    config = micro_config(model={"mode": "single_stage"},
                          train={"stage1_steps": 30, "stage2_steps": 0, "eval_every": 30, "checkpoint_every": 30,
                                 "ema_decay": 0.9})
    Trainer(config, tmp_path / "run").fit()
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "reconstructions.png").exists()
