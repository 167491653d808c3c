"""Any local text encoder: small random BERT, T5-encoder and CLIP-text-tower folders built offline with
``transformers`` (``save_pretrained`` into a temporary folder), embedded as Hugging Face computes them, checked
before any work (not a text encoder, a width that does not fit ``model.context_dim``, too few positions), and a
micro text model trained on one of them and sampled from a prompt file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the text extra: pip install 'ul-fast[text]'")

from ul_fast.config import ConfigError, config_from_dict  # noqa: E402
from ul_fast.text import TextEncoder, check_text_encoder, inspect_text_encoder  # noqa: E402
from ul_fast.train import Trainer  # noqa: E402
from ul_fast.train.preflight import check_text_model  # noqa: E402

from micro import micro_config  # noqa: E402

WORDS = "a an the photo of bag sneaker to left right next and on shirt coat red blue hat".split()
VOCAB = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
WIDTHS = {"bert": 32, "t5": 24, "clip": 16}


def tokenizer():
    """A word-level fast tokenizer built offline: [CLS] caption [SEP], padded with [PAD] (id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    inner = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    inner.normalizer = normalizers.Lowercase()
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                         special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Random tiny text encoders of three families, and a GPT-2 (a decoder, not a text encoder)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    models = {
        "bert": transformers.BertModel(transformers.BertConfig(
            vocab_size=len(VOCAB), hidden_size=WIDTHS["bert"], num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=24)),
        "t5": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(VOCAB), d_model=WIDTHS["t5"], d_kv=8, num_heads=3, num_layers=2, d_ff=48, pad_token_id=0,
            eos_token_id=3, decoder_start_token_id=0)),
        "clip": transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(VOCAB), hidden_size=WIDTHS["clip"], intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=12, pad_token_id=0, bos_token_id=2, eos_token_id=3)),
        "gpt2": transformers.GPT2Model(transformers.GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=1,
                                                               n_head=2)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer().save_pretrained(paths[name])
    return paths


CAPTIONS = ["a red bag to the left of a blue hat", "a photo of a coat", "", "A SHIRT on the right"]


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_a_local_encoder_gives_the_models_last_hidden_states(folders, kind, tmp_path):
    encoder = TextEncoder("cpu", tmp_path / "cache", max_tokens=12, encoder=str(folders[kind]))
    text = encoder.encode(CAPTIONS)
    width = WIDTHS[kind]
    assert encoder.dim == width and text.tokens.shape == (4, 12, width) and text.pooled.shape == (4, width)
    # The reference: the same model through transformers itself, on the same tokens.
    model_class = {"bert": transformers.AutoModel, "t5": transformers.T5EncoderModel,
                   "clip": transformers.CLIPTextModel}[kind]
    model = model_class.from_pretrained(folders[kind], local_files_only=True).eval()
    batch = transformers.AutoTokenizer.from_pretrained(folders[kind])(CAPTIONS, padding="max_length", max_length=12,
                                                                      truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.equal(text.mask, mask) and text.mask[2].sum() == 2  # "" is [CLS] [SEP]: the null caption
    torch.testing.assert_close(text.tokens, hidden * mask[..., None], rtol=0, atol=1e-6)  # same network, same batch
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(text.pooled, torch.nn.functional.normalize(mean, dim=1), rtol=0, atol=1e-6)
    assert (text.tokens[~text.mask] == 0).all()
    # Cached per caption, in a folder named after the encoder's files and the token length.
    cached = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 4 and cached[0].parent.name.startswith("hf-") and cached[0].parent.name.endswith("-T12")
    again = TextEncoder("cpu", tmp_path / "cache", max_tokens=12, encoder=str(folders[kind]))
    again.network = None  # a cache hit never runs the network
    assert torch.equal(again.encode(CAPTIONS[:2]).tokens, text.tokens[:2])
    with pytest.warns(UserWarning, match="truncated"):
        encoder.encode(["a photo of a red bag to the left of a blue coat and a hat"])


def test_config_json_decides_the_kind_width_and_positions(folders):
    assert [(i.model_type, i.hidden_size, i.max_tokens) for i in
            map(inspect_text_encoder, (folders["bert"], folders["t5"], folders["clip"]))] == [
        ("bert", 32, 24), ("t5", 24, None), ("clip_text_model", 16, 12)]


@pytest.mark.parametrize("case,match", [
    ("gpt2", r"holds a gpt2 model, not a text encoder ul-fast can use"),
    ("missing", r"not a folder"),
    ("no-config", r"no config\.json"),
    ("no-weights", r"cannot be loaded as a bert text encoder"),
    ("wrong-weights", r"its weights lack .* tensor\(s\) of a bert text encoder"),
])
def test_a_folder_that_is_not_a_usable_text_encoder_is_one_clear_error(folders, tmp_path, case, match):
    path = folders["gpt2"] if case == "gpt2" else tmp_path / "encoder"
    if case in ("no-config", "no-weights", "wrong-weights"):
        tokenizer().save_pretrained(path)
        if case != "no-config":
            (path / "config.json").write_text((folders["bert"] / "config.json").read_text())
        if case == "wrong-weights":  # a T5 checkpoint under a BERT config
            for weights in folders["t5"].glob("*.safetensors"):
                (path / weights.name).write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match=match) as error:
        TextEncoder("cpu", max_tokens=8, encoder=str(path))
    assert "\n" not in str(error.value)


def test_width_and_positions_are_checked_against_the_run_before_any_work(folders, tmp_path, capsys):
    with pytest.raises(ValueError, match="model.context_dim is 384 but .* gives 24-dimensional token states: set "
                                         "model.context_dim: 24"):
        check_text_encoder(folders["t5"], 384, 8)
    with pytest.raises(ValueError, match="model.text_max_tokens is 16 but .* has 12 positions"):
        check_text_encoder(folders["clip"], 16, 16)
    config = config_from_dict(text_config(folders["gpt2"], 16, "fmnist-embedded"))
    with pytest.raises(ConfigError, match="not a text encoder"):
        check_text_model(config)

    from ul_fast.cli import main

    (tmp_path / "c.yaml").write_text(json.dumps(text_config(folders["bert"], 384, "fmnist-embedded")))
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "set model.context_dim: 32" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="model.context_dim must be 384 for model.text_encoder minilm"):
        config_from_dict(text_config("minilm", 32, "fmnist-embedded"))


def text_config(encoder, context_dim: int, dataset: str) -> dict:
    return micro_config(model={"num_classes": 0, "context_dim": context_dim, "text_encoder": str(encoder),
                               "text_max_tokens": 10, "null_caption": "empty"},
                        data={"dataset": dataset},
                        train={"stage1_steps": 2, "stage2_steps": 3, "batch_size": 4, "eval_every": 1000}).to_dict()


def test_a_text_model_trains_on_a_bert_encoder_and_samples_a_prompt_file(folders, tmp_path):
    from PIL import Image

    from ul_fast.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for k, caption in enumerate(["a red bag", "a blue hat", "a coat on the left", "a shirt"]):
        Image.new("L", (16, 16), 40 * k).save(data / f"{k}.png")
        rows.append(json.dumps({"file_name": f"{k}.png", "text": caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows))
    run = tmp_path / "run"
    Trainer(config_from_dict(text_config(folders["bert"], WIDTHS["bert"], f"folder:{data}")), run).fit()
    assert next((run / "text-cache").iterdir()).name.startswith("hf-")
    (tmp_path / "prompts.txt").write_text("a red bag\n\na blue hat on the left\n")
    main(["sample", "--run", str(run), "--prompts", str(tmp_path / "prompts.txt"), "-n", "2", "--out",
          str(tmp_path / "grid.png"), "--negative-prompt", "a coat", "--no-progress"])
    index = json.loads((tmp_path / "grid" / "index.json").read_text())
    assert index == [{"file": "0001.png", "prompt": "a red bag"},
                     {"file": "0002.png", "prompt": "a blue hat on the left"}]
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "grid" / "0002.png").stat().st_size > 0
