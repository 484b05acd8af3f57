"""A tiny multimodal Qwen3.5 trained from scratch to caption scikit-learn's bundled digit images ("digit: 7").

Everything is local: the 1,797 8x8 digit images ship with scikit-learn, the tokenizer is a character table, and
the model is a 2-block vision tower feeding a 2-layer hybrid (Gated DeltaNet + attention) text model through the
same early fusion and multimodal rotary positions as the published models. Each image goes through the Qwen3.5
image processor (bicubic upscale to 16x16, 4x4-pixel patches, 2x2 merge: 4 image tokens). Held-out captions are
produced with `qwax.multimodal.generate` (greedy) and count as correct when the whole caption matches.

    python -m qwax.multimodal.digits            # or: python recipes/digits.py
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwax.config import QwaxConfig
from qwax.layers.vision import VisionConfig
from qwax.multimodal.config import MultimodalConfig
from qwax.multimodal.generate import generate
from qwax.multimodal.model import QwaxForConditionalGeneration, scatter_features
from qwax.multimodal.processor import VisionProcessor

SPECIALS = ("<pad>", "<eos>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
CHARS = "digt: 0123456789"
PAD, EOS, START, END, IMAGE, VIDEO = range(len(SPECIALS))
VOCAB = {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}
PROCESSOR = VisionProcessor(patch_size=4, merge_size=2, min_pixels=16 * 16, max_pixels=16 * 16)


@dataclass(frozen=True)
class DigitsRecipe:
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup: int = 40
    test_fraction: float = 0.2
    seed: int = 0


def encode(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def decode(ids) -> str:
    inverse = {v: k for k, v in VOCAB.items()}
    return "".join(inverse.get(int(i), "") for i in ids if int(i) != EOS)


def model_config() -> MultimodalConfig:
    text = QwaxConfig(model_type="qwen3_5_text", vocab_size=len(SPECIALS) + len(CHARS), hidden_size=64,
                      num_hidden_layers=2, full_attention_interval=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                      linear_value_head_dim=16, num_experts=0, intermediate_size=128, mrope_section=(1, 1, 0),
                      mrope_interleaved=True, max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD,
                      initializer_range=0.05)
    vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4,
                          out_hidden_size=64, num_position_embeddings=16, initializer_range=0.05)
    return MultimodalConfig(text=text, vision=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=START, vision_end_token_id=END)


def load_data(seed: int, test_fraction: float):
    """(pixel rows [n, 4, 96], labels [n]) for the train and test splits (a fixed shuffle)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    pixels = PROCESSOR.preprocess_images(list(images))["pixel_values"]
    per_image = pixels.shape[0] // len(images)
    pixels = pixels.reshape(len(images), per_image, -1)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(len(images) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (pixels[train], digits.target[train]), (pixels[test], digits.target[test])


def prompt(tokens_per_image: int) -> list[int]:
    return [START] + [IMAGE] * tokens_per_image + [END]


def train(recipe: DigitsRecipe = DigitsRecipe(), log=print):
    """Train; returns (model, test split, seconds)."""
    start = time.perf_counter()
    cfg = model_config()
    (train_px, train_y), test = load_data(recipe.seed, recipe.test_fraction)
    tokens_per_image = train_px.shape[1] // cfg.vision.merge_unit
    head = prompt(tokens_per_image)
    captions = np.array([head + encode(f"digit: {y}") + [EOS] for y in range(10)], np.int32)  # [10, L]
    length = captions.shape[1]
    loss_mask = np.zeros((length - 1,), np.float32)
    loss_mask[len(head) - 1:] = 1.0  # predict every caption token (and eos) after the image
    # Default RunOptions: float32; the two layers differ in kind, so nothing is scanned.
    model = QwaxForConditionalGeneration(cfg, rngs=nnx.Rngs(recipe.seed))
    positions, _ = model.rope_index(captions[:1], image_grid_thw=[[1, 4, 4]])
    grid = np.tile([[1, 4, 4]], (recipe.batch_size, 1))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.learning_rate, recipe.warmup, recipe.steps)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(params)

    def loss_fn(params, pixels, labels):
        m = nnx.merge(graphdef, params)
        ids = jnp.asarray(captions)[labels]
        x = m.language_model.embed(ids)
        feats = m.visual(pixels.reshape(-1, pixels.shape[-1]), grid)
        x = scatter_features(x, ids == IMAGE, feats)
        pos = jnp.broadcast_to(jnp.asarray(positions), (3, ids.shape[0], length))
        logits = m.language_model(None, position_ids=pos, inputs_embeds=x).logits[:, :-1]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:])
        return jnp.sum(nll * loss_mask) / (jnp.sum(loss_mask) * ids.shape[0])

    @jax.jit
    def step(params, opt_state, pixels, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(recipe.seed)
    for i in range(recipe.steps):
        batch = rng.integers(0, len(train_y), recipe.batch_size)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(train_px[batch]), jnp.asarray(train_y[batch]))
        if i % 50 == 0 or i == recipe.steps - 1:
            log(f"step {i:4d}  loss {float(loss):.4f}  {time.perf_counter() - start:6.1f}s")
    nnx.update(model, params)
    return model, test, time.perf_counter() - start


def evaluate(model: QwaxForConditionalGeneration, test, batch_size: int = 512) -> float:
    """Fraction of held-out images whose greedy caption is exactly "digit: <label>"."""
    pixels, labels = test
    tokens_per_image = pixels.shape[1] // model.config.vision.merge_unit
    correct = 0
    for lo in range(0, len(labels), batch_size):
        px, y = pixels[lo:lo + batch_size], labels[lo:lo + batch_size]
        ids = np.tile(prompt(tokens_per_image), (len(y), 1))
        grid = np.tile([[1, 4, 4]], (len(y), 1))
        out = generate(model, ids, max_new_tokens=9, pixel_values=px.reshape(-1, px.shape[-1]),
                       image_grid_thw=grid)
        correct += sum(decode(row[ids.shape[1]:]) == f"digit: {label}" for row, label in zip(out, y))
    return correct / len(labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DigitsRecipe.steps)
    parser.add_argument("--seed", type=int, default=DigitsRecipe.seed)
    args = parser.parse_args(argv)
    model, test, seconds = train(DigitsRecipe(steps=args.steps, seed=args.seed))
    t0 = time.perf_counter()
    accuracy = evaluate(model, test)
    print(f"held-out caption accuracy {accuracy:.3f} on {len(test[1])} images; train {seconds:.1f}s, "
          f"eval {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
