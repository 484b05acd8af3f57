"""`qwax generate` on a checkpoint written by qwax.save_hf with a tokenizer.json."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

import qwax
from qwax.cli import main


def _tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "a tiny model writes a tiny story"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["?"]))
    return tok


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint, tmp_path_factory):
    src, _ = hf_checkpoint("qwen3_5_text")
    model = qwax.load_hf(src)
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    qwax.save_hf(model, out)
    tok = _tokenizer(model.config.vocab_size)
    assert tok.get_vocab_size() <= model.config.vocab_size
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.slow
def test_generate_streams_text_and_reports_speed(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "the quick", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the quick") and len(captured.out) > len("the quick")
    assert "tokens/s" in captured.err


def test_missing_directory(capsys):
    assert main(["generate", "--checkpoint", "/nonexistent/dir", "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_tokenizer(hf_checkpoint, capsys):
    src, _ = hf_checkpoint("qwen3_5_text")
    assert main(["generate", "--checkpoint", str(src), "--prompt", "hi"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_prompt_longer_than_the_maximum(checkpoint, capsys):
    prompt = " ".join(["the quick brown fox"] * 200)
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt]) == 2
    assert "exceeds the model's maximum length 512" in capsys.readouterr().err


@pytest.mark.slow
def test_sampling_follows_the_seed(checkpoint, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "the quick", "--max-new-tokens", "8",
            "--temperature", "1.0"]
    outputs = []
    for seed in ("3", "3", "4"):
        assert main(args + ["--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
