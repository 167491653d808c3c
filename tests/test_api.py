"""The public API (``ul_fast.load``) and exported models: every call is the model's own method, batched and
seeded; images in and out in three forms; export → load is bit-exact; every bad input or folder is one line."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ul_fast
from ul_fast import cli
from ul_fast.api import ExportError, export_run
from ul_fast.api.export import MANIFEST_FILE
from ul_fast.data import load_dataset, uint8_to_float
from ul_fast.files import sha256_of_file, write_json_atomically
from ul_fast.train import Trainer

from cli_helpers import one_line_error
from micro import micro_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Micro runs on a small array data set: ``full`` (both stages), ``stage1`` (stage 2 never ran) and ``wide``
    (another encoder width: its weights fit no other run); exports of ``full``."""
    folder = tmp_path_factory.mktemp("api")
    splits = {split: load_dataset("fmnist-embedded", split, image_size=16) for split in ("train", "test")}
    arrays = {}
    for split, count in (("train", 200), ("test", 32)):
        arrays[f"{split}_images"] = ((splits[split].images[:count, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        arrays[f"{split}_labels"] = splits[split].labels[:count].numpy()
    np.savez(folder / "small.npz", **arrays)
    for name, stage2_steps, encoder in (("full", 1, [16, 16]), ("stage1", 0, [16, 16]), ("wide", 0, [24, 24])):
        config = micro_config(data={"dataset": f"array:{folder / 'small.npz'}"},
                              train={"stage1_steps": 2, "stage2_steps": stage2_steps, "eval_every": 1000,
                                     "checkpoint_every": 1000})
        config.model.encoder.channels = encoder
        Trainer(config, folder / name).fit()
    for part, dtype in (("all", "fp32"), ("all", "fp16"), ("all", "bf16"), ("encoder-decoder", "fp32")):
        export_run(folder / "full", folder / f"export-{part}-{dtype}", part=part, dtype=dtype)
    return folder


@pytest.fixture(scope="module")
def model(runs):
    return ul_fast.load(runs / "full")


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the calls
def test_each_call_is_the_models_own_method_seeded(model):
    x, m = images(), model.model
    assert torch.equal(model.encode(x), m.encode(x))
    assert torch.equal(model.encode(x, noisy=True, seed=3), m.noisy_latent(m.encode(x), generator=gen(3)))
    z_0 = model.encode(x, noisy=True)
    assert torch.equal(model.decode(z_0, steps=3, seed=4), m.decode(z_0, 3, "ddim", gen(4)))
    assert torch.equal(model.reconstruct(x, steps=2, sampler="heun", seed=5), m.reconstruct(x, 2, "heun", gen(5)))
    labels = torch.tensor([3, 1, 4])
    expected = m.sample(3, 2, 3, "ddim", gen(6), labels=labels, guidance=2.5,
                        guidance_interval=tuple(model.config.sample.guidance_interval))
    assert torch.equal(model.sample(3, labels=labels, latent_steps=2, decoder_steps=3, guidance=2.5, seed=6), expected)
    pixels = 16 * 16 * math.log(2)
    assert torch.equal(model.bits_per_pixel(x, seed=7), m.latent_nats(x, generator=gen(7)).double() / pixels)
    base = m.latent_nats(x, "base", labels=torch.full((5,), 2), generator=gen(8)).double() / pixels
    assert torch.equal(model.bits_per_pixel(x, network="base", labels=2, seed=8), base)


def test_defaults_come_from_the_runs_sampling_config(model):
    s = model.config.sample
    z_0 = model.encode(images(2), noisy=True)
    assert torch.equal(model.decode(z_0), model.model.decode(z_0, s.decoder_steps, s.sampler, gen(0)))
    every_class = torch.arange(4) % model.num_classes  # no labels: every class in turn, as ul-fast sample does
    expected = model.model.sample(4, s.latent_steps, s.decoder_steps, s.sampler, gen(0), labels=every_class,
                                  guidance=s.guidance, guidance_interval=tuple(s.guidance_interval))
    assert torch.equal(model.sample(4), expected)


def test_batches_are_the_models_calls_on_consecutive_slices(runs):
    model = ul_fast.load(runs / "full", batch_size=2)
    x, m, g = images(5), model.model, gen(1)
    assert torch.equal(model.encode(x), torch.cat([m.encode(x[a:a + 2]) for a in (0, 2, 4)]))
    expected = torch.cat([m.reconstruct(x[a:a + 2], 2, "ddim", g) for a in (0, 2, 4)])
    assert torch.equal(model.reconstruct(x, steps=2, seed=1), expected)


def test_seeds_make_every_call_reproducible(model):
    x = images(3)
    for call in (lambda s: model.encode(x, noisy=True, seed=s), lambda s: model.reconstruct(x, steps=2, seed=s),
                 lambda s: model.sample(3, steps=2, seed=s), lambda s: model.bits_per_pixel(x, seed=s)):
        assert torch.equal(call(0), call(0))
        assert not torch.equal(call(0), call(1))


def test_no_gradients_are_kept(model):
    x = images(2).requires_grad_()
    assert not model.encode(x).requires_grad and not model.bits_per_pixel(x).requires_grad


def test_bits_per_pixel_repeats_average_the_draws(model):
    x, g = images(4), gen(2)  # one generator, drawn from three times in turn
    draws = torch.stack([model.model.latent_nats(x, generator=g).double() for _ in range(3)])
    # The same fp64 values summed in the same order; only the division by 3 may round differently (≤ 1 ulp).
    torch.testing.assert_close(model.bits_per_pixel(x, seed=2, repeats=3), draws.mean(0) / (16 * 16 * math.log(2)),
                               rtol=4e-16, atol=0)


def test_images_in_three_forms_and_out_in_three(model):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    as_float = uint8_to_float(pixels)[:, None]
    reference = model.encode(as_float)
    pil = [Image.fromarray(p) for p in pixels]
    for form in (pixels, pixels[..., None], pixels[:, None], torch.from_numpy(pixels)[:, None], pil,
                 [p.convert("RGB") for p in pil]):
        assert torch.equal(model.encode(form), reference)
    one = model.model.encode(as_float[:1])  # a batch of one (the CPU convolutions round per batch shape)
    assert torch.equal(model.encode(pil[0]), one) and torch.equal(model.encode(as_float[0]), one)
    out = model.reconstruct(as_float, steps=2, output="numpy")
    assert out.dtype == np.uint8 and out.shape == (3, 16, 16, 1)
    tensor = model.reconstruct(as_float, steps=2)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 16, 16) and tensor.abs().max() <= 1
    assert np.array_equal(out[..., 0], ((tensor[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    pictures = model.sample(2, steps=2, output="pil")
    assert len(pictures) == 2 and pictures[0].mode == "L" and pictures[0].size == (16, 16)


@pytest.mark.parametrize("call,words", [
    (lambda m: m.encode(torch.rand(2, 1, 16, 16) * 3), ("images", "[-1, 1]")),
    (lambda m: m.encode(torch.zeros(2, 1, 28, 28)), ("images", "16x16", "not resized")),
    (lambda m: m.encode(torch.zeros(2, 3, 16, 16)), ("1 channel",)),
    (lambda m: m.encode(np.zeros((2, 16, 16), np.int32)), ("uint8",)),
    (lambda m: m.encode("picture.png"), ("images", "str")),
    (lambda m: m.encode([Image.new("L", (16, 16)), Image.new("L", (8, 8))]), ("differ in size",)),
    (lambda m: m.decode(torch.zeros(2, 4, 8, 8)), ("latents", "[B, 4, 4, 4]")),
    (lambda m: m.decode(torch.full((1, 4, 4, 4), math.nan)), ("non-finite",)),
    (lambda m: m.decode(torch.zeros(1, 4, 4, 4), output="jpeg"), ("output", "pil")),
    (lambda m: m.decode(torch.zeros(1, 4, 4, 4), sampler="euler"), ("sampler", "dpmpp_2m")),
    (lambda m: m.decode(torch.zeros(1, 4, 4, 4), steps=0), ("steps",)),
    (lambda m: m.sample(0), ("n must be a positive integer",)),
    (lambda m: m.sample(2, labels=10), ("labels", "[0, 10)")),
    (lambda m: m.sample(2, labels=[1, 2, 3]), ("labels", "2 of them")),
    (lambda m: m.sample(2, prompts="a photo of a bag"), ("prompts", "not text-conditioned")),
    (lambda m: m.sample(2, guidance=-1.0), ("guidance",)),
    (lambda m: m.sample(2, seed=1.5), ("seed",)),
    (lambda m: m.bits_per_pixel(torch.zeros(1, 1, 16, 16), network="decoder"), ("network",)),
])
def test_bad_arguments_are_one_line_errors(model, call, words):
    with pytest.raises((ValueError, TypeError)) as error:
        call(model)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_run_without_a_base_model_samples_its_prior_with_a_warning(runs):
    model = ul_fast.load(runs / "stage1")
    with pytest.warns(UserWarning, match="sampling its stage-1 prior"):
        got = model.sample(2, steps=2, seed=1)
    s = model.config.sample
    assert torch.equal(got, model.model.sample(2, 2, 2, s.sampler, gen(1), use_prior=True))
    with pytest.raises(ValueError, match="no trained base model"):
        model.sample(2, labels=1)


def test_load_takes_device_and_compute_dtype(runs):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device is 'cuda' but CUDA is not available"):
            ul_fast.load(runs / "full", device="cuda")
    with pytest.raises(ValueError, match="device"):
        ul_fast.load(runs / "full", device="gpu")
    with pytest.raises(ValueError, match="dtype"):
        ul_fast.load(runs / "full", dtype="int8")
    bf16 = ul_fast.load(runs / "full", dtype="bf16")
    x = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = bf16.model.encode(x).float()
    assert torch.equal(bf16.encode(x), expected)
    assert next(bf16.model.parameters()).dtype == torch.float32  # weights stay fp32


def test_import_ul_fast_stays_light():
    code = "import sys, ul_fast; assert 'torch' not in sys.modules and 'load' in ul_fast.__all__"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ export
def test_export_then_load_is_bit_exact(runs, model):
    exported = ul_fast.load(runs / "export-all-fp32")
    assert exported.kind == "export" and exported.networks == ("encoder", "prior", "decoder", "base")
    for name in exported.networks:
        original, loaded = getattr(model.model, name).state_dict(), getattr(exported.model, name).state_dict()
        assert original.keys() == loaded.keys()
        assert all(torch.equal(original[k], loaded[k]) for k in original), name
    x = images(3)
    assert torch.equal(exported.reconstruct(x, steps=2), model.reconstruct(x, steps=2))
    assert torch.equal(exported.sample(3, steps=2, seed=2), model.sample(3, steps=2, seed=2))
    assert exported.config.model == model.config.model and exported.config.sample == model.config.sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exports_round_each_weight_once(runs, model, dtype):
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    exported = ul_fast.load(runs / f"export-all-{name}")
    for network in exported.networks:
        original, loaded = getattr(model.model, network).state_dict(), getattr(exported.model, network).state_dict()
        assert all(torch.equal(loaded[k], original[k].to(dtype).float()) for k in original), network


def test_encoder_decoder_export_encodes_and_decodes_only(runs, model):
    tokenizer = ul_fast.load(runs / "export-encoder-decoder-fp32")
    assert tokenizer.networks == ("encoder", "decoder")
    x = images(2)
    assert torch.equal(tokenizer.reconstruct(x, steps=2), model.reconstruct(x, steps=2))
    for call in (lambda: tokenizer.sample(2), lambda: tokenizer.bits_per_pixel(x)):
        with pytest.raises(ValueError, match="--part all"):
            call()


def test_export_folder_layout_and_card(runs):
    folder = runs / "export-all-fp16"
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "manifest.json", "README.md", "encoder.safetensors", "prior.safetensors",
                     "decoder.safetensors", "base.safetensors"}
    config = json.loads((folder / "config.json").read_text())
    assert config["image_size"] == 16 and "train" not in config and "stage1_steps" not in config
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["dtype"] == "fp16" and manifest["data"]["dataset"].startswith("array:")
    assert all(manifest["files"][n] == sha256_of_file(folder / n) for n in names - {MANIFEST_FILE})
    card = (folder / "README.md").read_text()
    assert "array:" in card and "no eval.json" in card
    assert not list(runs.glob(".export-*"))  # no staging folder left behind


def test_export_carries_the_runs_eval_figures_into_the_card(runs, tmp_path):
    write_json_atomically(runs / "stage1" / "eval.json", {"samples": 16, "rfd": 12.5, "psnr": 14.25, "gfd": None,
                                                           "reference_images": 200, "sampler": "ddim"})
    try:
        out = export_run(runs / "stage1", tmp_path / "card")
    finally:
        (runs / "stage1" / "eval.json").unlink()
    card = (out / "README.md").read_text()
    assert "| 12.5 |" in card and "14.25" in card and "200 training images" in card
    assert json.loads((out / MANIFEST_FILE).read_text())["base_model_trained"] is False


def test_export_refuses_to_overwrite_anything_but_with_overwrite_an_export(runs, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_line_error(capsys, ["export", "--run", str(runs / "full"), "--out", str(other)], "not an exported model")
    assert (other / "keep.txt").read_text() == "mine"
    out = tmp_path / "model"
    cli.main(["export", "--run", str(runs / "full"), "--out", str(out), "--part", "encoder-decoder"])
    assert "exported" in capsys.readouterr().out
    one_line_error(capsys, ["export", "--run", str(runs / "full"), "--out", str(out)], "--overwrite")
    cli.main(["export", "--run", str(runs / "full"), "--out", str(out), "--overwrite", "--dtype", "bf16"])
    assert json.loads((out / MANIFEST_FILE).read_text())["dtype"] == "bf16"
    one_line_error(capsys, ["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")],
                   "not a ul_fast run folder")
    one_line_error(capsys, ["export", "--run", str(runs / "full"), "--out", str(out), "--dtype", "fp8"], "--dtype")
    one_line_error(capsys, ["export", "--run", str(runs / "full"), "--out", str(out), "--part", "prior"], "--part")


def _copy_export(runs, tmp_path, name="bad"):
    import shutil

    return shutil.copytree(runs / "export-all-fp32", tmp_path / name)


def _rehash(folder, name):
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][name] = sha256_of_file(folder / name)
    write_json_atomically(folder / MANIFEST_FILE, manifest)


def test_bad_folders_are_one_line_errors(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(empty, ("not a ul_fast run folder", "manifest.json")),
             (tmp_path / "missing", ("not a ul_fast run folder", "fmnist-tiny")),
             ("fmnist-small", ("not a ul_fast run folder", "fmnist-tiny"))]

    corrupt = _copy_export(runs, tmp_path, "corrupt")  # a flipped byte: the SHA-256 check catches it
    data = bytearray((corrupt / "decoder.safetensors").read_bytes())
    data[-1] ^= 1
    (corrupt / "decoder.safetensors").write_bytes(bytes(data))
    cases.append((corrupt, ("decoder.safetensors", "SHA-256")))

    swapped = _copy_export(runs, tmp_path, "swapped")  # a wrong file, its hash updated: names do not match
    (swapped / "prior.safetensors").write_bytes((swapped / "base.safetensors").read_bytes())
    _rehash(swapped, "prior.safetensors")
    cases.append((swapped, ("prior.safetensors", "does not match this model", "unexpected")))

    mismatched = _copy_export(runs, tmp_path, "mismatched")  # same names, other shapes (a wider encoder)
    export_run(runs / "wide", tmp_path / "wide")
    (mismatched / "encoder.safetensors").write_bytes((tmp_path / "wide" / "encoder.safetensors").read_bytes())
    _rehash(mismatched, "encoder.safetensors")
    cases.append((mismatched, ("encoder.safetensors", "has shape", "the model expects")))

    not_weights = _copy_export(runs, tmp_path, "not-weights")
    (not_weights / "base.safetensors").write_text("hello")
    _rehash(not_weights, "base.safetensors")
    cases.append((not_weights, ("base.safetensors", "not a safetensors file")))

    bad_key = _copy_export(runs, tmp_path, "bad-key")
    config = json.loads((bad_key / "config.json").read_text())
    config["latent_chanels"] = 4
    write_json_atomically(bad_key / "config.json", config)
    _rehash(bad_key, "config.json")
    cases.append((bad_key, ("config.json", "latent_chanels")))

    foreign = _copy_export(runs, tmp_path, "foreign")
    write_json_atomically(foreign / MANIFEST_FILE, {"format": "someone.else"})
    cases.append((foreign, ("manifest.json", "ul_fast.export.v1")))

    incomplete = _copy_export(runs, tmp_path, "incomplete")
    (incomplete / "base.safetensors").unlink()
    cases.append((incomplete, ("base.safetensors", "missing")))

    for source, words in cases:
        with pytest.raises(ExportError) as error:
            ul_fast.load(source)
        assert "\n" not in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
        one_line_error(capsys, ["sample", "--run", str(source)], *words)


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_samples_an_export_as_it_does_the_run(runs, tmp_path, capsys):
    options = ["-n", "4", "--latent-steps", "2", "--decoder-steps", "2", "--no-progress"]
    for source in (runs / "full", runs / "export-all-fp32"):
        cli.main(["sample", "--run", str(source), "--out", str(tmp_path / f"{source.name}.png"), *options])
    assert (tmp_path / "full.png").read_bytes() == (tmp_path / "export-all-fp32.png").read_bytes()
    one_line_error(capsys, ["sample", "--run", str(runs / "export-encoder-decoder-fp32")], "no base model",
                   "--part all")


def test_cli_evaluates_an_encoder_decoder_export_into_its_folder(runs, capsys):
    folder = runs / "export-encoder-decoder-fp32"
    cli.main(["eval", "--run", str(folder), "--samples", "8", "--decoder-steps", "2", "--no-progress"])
    capsys.readouterr()
    result = json.loads((folder / "eval.json").read_text())
    (folder / "eval.json").unlink()
    assert math.isfinite(result["rfd"]) and math.isfinite(result["psnr"])
    assert result["bits_per_pixel_prior"] is None and result["gfd"] is None  # no prior, no base model


def test_cli_evaluates_on_data_given_with_data(runs, tmp_path, capsys):
    """A model whose data spec does not resolve here (a shipped model's `fmnist` away from Debian's path) is
    evaluated on data given with --data: eval.json records what it was scored on."""
    folder = tmp_path / "export"
    shutil.copytree(runs / "export-encoder-decoder-fp32", folder)
    eval_args = ["--samples", "8", "--decoder-steps", "2", "--no-progress"]
    cli.main(["eval", "--run", str(folder), "--data", "fmnist-embedded", *eval_args])
    capsys.readouterr()
    result = json.loads((folder / "eval.json").read_text())
    assert result["dataset"] == "fmnist-embedded" and result["held_out"] and math.isfinite(result["rfd"])
    assert result["reference_images"] == len(load_dataset("fmnist-embedded", "train", image_size=16))
    with pytest.raises(SystemExit):
        cli.main(["eval", "--run", str(folder), "--data", f"latents:{tmp_path}", *eval_args])
    assert "--data must name images" in capsys.readouterr().err


def test_cli_evaluates_a_shipped_model_without_writing_into_the_package(runs, monkeypatch, capsys):
    from ul_fast.api import sources

    folder = runs / "export-all-fp16"
    monkeypatch.setitem(sources.SHIPPED_MODELS, "micro-shipped", sha256_of_file(folder / MANIFEST_FILE))
    monkeypatch.setattr(sources, "shipped_model_folder", lambda name: folder)
    cli.main(["eval", "--run", "micro-shipped", "--samples", "4", "--latent-steps", "2", "--decoder-steps", "2",
              "--no-progress"])
    out, err = capsys.readouterr()
    assert "rFD" in out and "shipped model" in err and not (folder / "eval.json").exists()
