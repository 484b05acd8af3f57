"""The tiny checkpoint the serving tests run: a random Qwen3.5 model with qwax's tokenizer, chat template and
generation config, as the main job exports them."""

from __future__ import annotations

from hf_models import make_hf_model

VOCAB = 384
CONTEXT = 2048


def build_served_checkpoint(path):
    """Write the checkpoint into `path`; returns the transformers model."""
    from qwax import data as qdata
    docs = qdata.read_documents(["default"])[:400]
    tok = qdata.train_bpe(docs, VOCAB)
    hf = make_hf_model("qwen3_5_text", path, vocab_size=VOCAB, eos_token_id=qdata.eos_id(tok),
                       pad_token_id=qdata.eos_id(tok), max_position_embeddings=CONTEXT)
    qdata.save_for_hf(tok, str(path))  # tokenizer, chat template, generation_config.json
    return hf


