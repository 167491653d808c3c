"""Exported models: a self-contained folder that loads without the run folder it came from, and without pickle.

Layout (``ul-fast export --run RUN --out DIR``)::

    DIR/config.json            the model's configuration (the ``model:`` section of the run's config.yaml)
    DIR/encoder.safetensors    one file per network, holding its EMA weights (fp32, fp16 or bf16)
    DIR/decoder.safetensors
    DIR/prior.safetensors      (part "all", where the model has a prior)
    DIR/base.safetensors       (part "all")
    DIR/manifest.json          format, part, dtype, sampling defaults, data, provenance, SHA-256 of every file
    DIR/README.md              the model card: what it is, the data it was trained on, its eval.json figures

Part ``encoder-decoder`` is the tokenizer: encode, decode and reconstruct; part ``all`` adds the prior (the
latent's bitrate) and the base model (generation). Weights are stored in ``dtype`` and loaded back into fp32
networks, so fp32 export → load is bit-exact, and fp16/bf16 round each weight once.

Loading (:func:`load_export`) checks everything before a weight is used, each failure one line naming the file:
a folder that is not an export, an unknown format, a config with a bad key, a missing file, a file whose SHA-256
differs from the manifest's, a file with missing, unexpected or wrongly shaped tensors (another network, another
config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ul_fast.config import Config, ConfigError, config_from_dict
from ul_fast.files import sha256_of_file, write_atomically, write_json_atomically
from ul_fast.model import UnifiedLatents
from ul_fast.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    load_state,
    load_trained_model,
    newest_readable_checkpoint,
    read_weights,
)
from ul_fast.train.run_info import base_model_trained

__all__ = ["CARD_FILE", "CONFIG_FILE", "DTYPES", "ExportError", "ExportedModel", "FORMAT", "MANIFEST_FILE", "PARTS",
           "export_run", "is_export", "load_export", "read_export"]

FORMAT = "ul_fast.export.v1"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
PARTS = {"encoder-decoder": ("encoder", "decoder"), "all": UnifiedLatents.NETWORKS}
"""``--part``: the networks each part exports (``all``: every network the model has)."""
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``--dtype``: storage precision of the weights."""


class ExportError(ValueError):
    """An export cannot be written as asked, or a folder is not a loadable exported model (names the file)."""


@dataclass
class ExportedModel:
    """What an exported folder declares, checked (:func:`read_export`); no weights are read.

    config: the model config, the run's sampling defaults and its data spec (train settings are defaults);
    networks: the exported networks; base_model_trained: whether ``base`` holds a trained base model (False for
    a run whose stage 2 never ran: sampling then uses the stage-1 prior); manifest: ``manifest.json`` as read.
    """

    path: Path
    config: Config
    networks: tuple[str, ...]
    base_model_trained: bool
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------------------------- writing
def export_run(run_dir: str | Path, out_dir: str | Path, *, part: str = "all", dtype: str = "fp32",
               overwrite: bool = False, card_notes: str = "", dataset: str | None = None) -> Path:
    """Export the EMA weights of the newest readable checkpoint of ``run_dir`` into ``out_dir``; returns it.

    part: a key of :data:`PARTS`; dtype: a key of :data:`DTYPES`. ``out_dir`` must not exist or be empty, or
    (``overwrite``) hold an earlier export, which is replaced. The folder is written under a temporary name
    next to ``out_dir`` and renamed into place, so it is complete or absent. ``card_notes``: Markdown added to
    the model card (e.g. how the run was trained). ``dataset``: the data spec to record instead of the run's
    own, for a run that read a copy of data with a standard spec (e.g. ``fmnist`` for Fashion-MNIST's files
    copied elsewhere), so that ``ul-fast eval`` of the export finds it on other machines.
    """
    if part not in PARTS:
        raise ExportError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_destination(out_dir, overwrite)
    config, model = load_trained_model(run_dir)
    with warnings.catch_warnings():  # a skipped checkpoint was reported when the weights were read
        warnings.simplefilter("ignore", CheckpointWarning)
        checkpoint, state = newest_readable_checkpoint(run_dir, load_state)
    base_trained = base_model_trained(run_dir)
    networks = tuple(name for name in PARTS[part] if getattr(model, name) is not None)
    evaluation = _read_eval(run_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        files = {}
        parameters = {}
        for name in networks:
            weights = _cast_weights(getattr(model, name), DTYPES[dtype], name)
            parameters[name] = sum(t.numel() for t in weights.values())
            data = safetensors_bytes(weights, metadata={"format": FORMAT, "network": name})
            write_atomically(staging / f"{name}.safetensors", data)
            files[f"{name}.safetensors"] = sha256_of_file(staging / f"{name}.safetensors")
        write_json_atomically(staging / CONFIG_FILE, dataclasses.asdict(config.model))
        files[CONFIG_FILE] = sha256_of_file(staging / CONFIG_FILE)
        manifest = {
            "format": FORMAT,
            "part": part,
            "networks": list(networks),
            "dtype": dtype,
            "parameters": parameters,
            "base_model_trained": base_trained and "base" in networks,
            "sample": dataclasses.asdict(config.sample),
            "data": {"dataset": dataset or config.data.dataset},
            "image_shape": list(model.image_shape),
            "latent_shape": list(model.latent_shape),
            "source": {"run": run_dir.resolve().name, "checkpoint": checkpoint.name, "stage": state["stage"],
                       "stage1_steps": config.train.stage1_steps, "stage2_steps": config.train.stage2_steps,
                       "batch_size": config.train.batch_size, "seed": config.train.seed},
            "eval": evaluation,
        }
        write_atomically(staging / CARD_FILE, model_card(out_dir.name, manifest, config, card_notes))
        files[CARD_FILE] = sha256_of_file(staging / CARD_FILE)
        manifest["files"] = files
        write_json_atomically(staging / MANIFEST_FILE, manifest)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the export from other users
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not is_export(out_dir):
        raise ExportError(f"--out {out_dir} exists and is not an exported model; choose a new or empty folder")
    if not overwrite:
        raise ExportError(f"--out {out_dir} already holds an exported model; pass --overwrite to replace it")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` folder to ``out_dir`` (an empty or earlier export there is replaced)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cast_weights(network: torch.nn.Module, dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """The network's state dict on the CPU, floating tensors in ``dtype``; a weight that overflows it is an
    error (fp16 tops out at 65504)."""
    weights = {}
    for key, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            cast = tensor.to(dtype)
            if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
                raise ExportError(f"{name}.{key} does not fit {dtype} (largest |weight| "
                                  f"{float(tensor.abs().max()):.4g}); export with --dtype fp32 or bf16")
            tensor = cast
        weights[key] = tensor.contiguous()
    return weights


def _read_eval(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``eval.json`` (written by ``ul-fast eval``), or None when it has none."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ExportError(f"{path} is not valid JSON ({error}); rerun ul-fast eval or remove it") from None
    record.pop("run", None)  # the run's path on the machine that evaluated it; the manifest names the run
    return record


EVAL_ROWS = (("rFD", "rfd"), ("rKID", "rkid"), ("PSNR (dB)", "psnr"), ("gFD", "gfd"), ("gKID", "gkid"),
             ("bits/pixel (prior)", "bits_per_pixel_prior"), ("bits/pixel (base model)", "bits_per_pixel_base"))


def eval_table(evaluation: dict[str, Any]) -> str:
    """The figures of an ``eval.json`` record as a Markdown table with the settings they were measured under."""
    def number(key: str) -> str:
        value = evaluation.get(key)
        if value is None:
            return "n/a"
        error = evaluation.get(key + "_se")
        return f"{value:.4g}" + ("" if error is None else f" ± {error:.2g}")

    header = "| " + " | ".join(name for name, _ in EVAL_ROWS) + " |"
    rule = "|" + " --- |" * len(EVAL_ROWS)
    row = "| " + " | ".join(number(key) for _, key in EVAL_ROWS) + " |"
    versions = evaluation.get("versions", {})
    settings = (f"{evaluation.get('samples')} held-out images and as many samples, {evaluation.get('features')} "
                f"features, {evaluation.get('sampler')} sampler ({evaluation.get('latent_steps')} latent + "
                f"{evaluation.get('decoder_steps')} decoder steps, {evaluation.get('spacing')} spacing), guidance "
                f"{evaluation.get('guidance')}, seed {evaluation.get('seed')}; gFD against "
                f"{evaluation.get('reference_images')} training images; torch {versions.get('torch', '?')}, "
                f"{evaluation.get('elapsed_s', 0):.0f} s")
    return "\n".join([header, rule, row, "", settings])


def model_card(name: str, manifest: dict[str, Any], config: Config, notes: str = "") -> str:
    """The README.md of an export: what the model is, its data, how it was trained, its figures, its use."""
    m, source = config.model, manifest["source"]
    conditioning = (f"class-conditional ({m.num_classes} classes)" if m.num_classes else
                    "text-conditional (all-MiniLM-L6-v2 captions)" if m.context_dim else "unconditional")
    parameters = ", ".join(f"{n} {count / 1e6:.2f} M" for n, count in manifest["parameters"].items())
    lines = [
        f"# {name}: a Unified Latents model exported by ul_fast",
        "",
        f"Networks: {', '.join(manifest['networks'])} (part `{manifest['part']}`), EMA weights stored as "
        f"{manifest['dtype']}; parameters: {parameters}.",
        f"Images {'×'.join(map(str, manifest['image_shape']))} in [−1, 1]; latents "
        f"{'×'.join(map(str, manifest['latent_shape']))} with λ_z(0) = {m.latent_logsnr_0}; base model {conditioning}"
        + ("" if manifest["base_model_trained"] else " (not exported or not trained: sampling uses the prior)")
        + f"; decoder weighting c_lf = {m.decoder_weighting.factor}, b = {m.decoder_weighting.bias}.",
        "",
        "## Data",
        "",
        f"Trained on `{manifest['data']['dataset']}`"
        + (f" ({manifest['eval']['reference_images']} training images)" if manifest.get("eval") else "") + ".",
        "",
        "## Training",
        "",
        f"Run `{source['run']}`, checkpoint `{source['checkpoint']}` (stage {source['stage']}); "
        f"{source['stage1_steps']} stage-1 and {source['stage2_steps']} stage-2 steps of batch "
        f"{source['batch_size']}, seed {source['seed']}.",
        "",
        "## Evaluation (`ul-fast eval`)",
        "",
        eval_table(manifest["eval"]) if manifest.get("eval") else "The run had no eval.json when it was exported.",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import ul_fast",
        "",
        f'model = ul_fast.load("{name}")  # the path of this folder (a shipped model: its name)',
        "z = model.encode(images)  # z_clean; images: a tensor in [-1, 1], a uint8 array or PIL images",
        "x = model.decode(model.encode(images, noisy=True, seed=0), seed=0)  # UL's diffusion decoder",
        "```",
        "",
        "Files and their SHA-256 are listed in `manifest.json`; loading verifies them.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- reading
def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` looks like an exported model (holds a manifest.json)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_export(folder: str | Path) -> ExportedModel:
    """The manifest and config of an exported folder, checked (formats, keys, files present); no weights read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder (an exported model is a folder with {MANIFEST_FILE})")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        hint = " (it is a run folder: load it as a run)" if (folder / "config.yaml").is_file() else ""
        raise ExportError(f"{folder} is not an exported ul_fast model: it has no {MANIFEST_FILE}{hint}")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ExportError(f"{manifest_path} is not a ul_fast export manifest (format {FORMAT} expected, got {found!r})")
    networks = tuple(manifest.get("networks", ()))
    unknown = sorted(set(networks) - set(UnifiedLatents.NETWORKS))
    if unknown or not {"encoder", "decoder"} <= set(networks) or manifest.get("dtype") not in DTYPES:
        raise ExportError(f"{manifest_path}: networks must include encoder and decoder, from "
                          f"{', '.join(UnifiedLatents.NETWORKS)}, and dtype be one of {', '.join(DTYPES)}; got "
                          f"networks {list(networks)}, dtype {manifest.get('dtype')!r}")
    files = manifest.get("files", {})
    for name in [CONFIG_FILE, *(f"{n}.safetensors" for n in networks)]:
        if name not in files:
            raise ExportError(f"{manifest_path} lists no SHA-256 for {name}")
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name} is missing (the export is incomplete)")
    model_config = _read_json(folder / CONFIG_FILE)
    try:
        config = config_from_dict({"model": model_config, "sample": manifest.get("sample", {}),
                                   "data": {"dataset": manifest.get("data", {}).get("dataset", "fmnist-embedded")}})
    except ConfigError as error:
        raise ExportError(f"{folder / CONFIG_FILE}: {error}") from None
    return ExportedModel(folder, config, networks, bool(manifest.get("base_model_trained")) and "base" in networks,
                         manifest)


def load_export(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ExportedModel, UnifiedLatents]:
    """``(export, model)``: the checked declaration of an exported folder and its model, in eval mode on
    ``device`` with fp32 weights. Every file is verified against the manifest's SHA-256 first; a network that
    was not exported is ``None`` on the model (``model.prior``, ``model.base``)."""
    export = read_export(folder)
    for name, expected in export.manifest["files"].items():
        path = export.path / name
        if path.is_file() and sha256_of_file(path) != expected:
            raise ExportError(f"{path} fails its SHA-256 check against {MANIFEST_FILE} (corrupt, or replaced by "
                              f"another file)")
    model = UnifiedLatents(export.config.model)
    for name in UnifiedLatents.NETWORKS:
        if name not in export.networks:
            setattr(model, name, None)
        elif getattr(model, name) is None:
            raise ExportError(f"{export.path}: {name}.safetensors is exported but this config has no {name} network")
    dtype = DTYPES[export.manifest["dtype"]]
    for name in export.networks:
        network, path = getattr(model, name), export.path / f"{name}.safetensors"
        try:
            weights = read_weights(network, path)
        except CheckpointError as error:
            raise ExportError(str(error)) from None
        wrong = sorted(k for k, t in weights.items() if t.is_floating_point() and t.dtype != dtype)
        if wrong:
            raise ExportError(f"{path}: {wrong[0]} is {weights[wrong[0]].dtype}, the manifest says "
                              f"{export.manifest['dtype']}")
        network.load_state_dict(weights)  # copied into the fp32 parameters
    return export, model.to(device).eval()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{path} is unreadable or not JSON: {error}") from None
