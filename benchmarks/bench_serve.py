"""Tokens/s through `qwax serve` against `qwax.generate` on the same model, and with 8 concurrent clients.

The model is the main job's (the `tiny` recipe: its config, the BPE trained on the embedded corpus, the chat
template and generation config its export carries), with random weights: speed does not depend on them. Steps:

1. `qwax.generate` in this process: one chat prompt (the template's rendering of a short conversation), greedy,
   `--new-tokens` tokens with no stop, batch 1; a warm-up call compiles, then the best of `--repeats` calls.
2. `qwax serve` in a subprocess on the same checkpoint, driven by the `openai` client: warm-up requests compile
   the 1-row and 8-row batches (two rounds each); then
   - 1 client: `--repeats` sequential chat completions of the same prompt (greedy, ignore_eos, the same token
     count); the best is reported;
   - 8 clients: 8 threads send the same kind of request at once (each its own prompt), `--repeats` times; the
     aggregate tokens/s is the total completion tokens over the wall time of the round, the best round reported.
Printed: the three rates and the ratios server(1) / generate (target >= 0.9) and server(8) / server(1)
(target >= 3). Tokens/s include each request's prefill, on both sides.

    python benchmarks/bench_serve.py [--new-tokens 128] [--repeats 5] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from flax import nnx

import qwax
from qwax import data as qdata
from qwax.inference.chat_template import ChatTemplate
from qwax.train.recipes import get_recipe

CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def build_checkpoint(path: str) -> None:
    """The main job's model (random weights) exported with its tokenizer, chat template and generation config."""
    recipe = get_recipe("tiny")
    docs = qdata.read_documents(recipe.data, recipe.text_field)
    tok = qdata.train_bpe(docs, recipe.vocab_size)
    cfg = recipe.model_config(vocab_size=recipe.vocab_size)
    model = qwax.QwaxForCausalLM(cfg, recipe.run_options(), rngs=nnx.Rngs(0))
    qwax.save_hf(model, path, extra_files=lambda tmp: qdata.save_for_hf(tok, tmp))


def generate_rate(path: str, new_tokens: int, repeats: int) -> float:
    from qwax.inference.tokenizer import load_tokenizer

    model = qwax.load_hf(path)
    tok = load_tokenizer(path)
    prompt = ChatTemplate.from_checkpoint(path).render(CONVERSATION, add_generation_prompt=True,
                                                       enable_thinking=False)
    ids = np.asarray([tok.encode(prompt, add_special_tokens=False).ids], np.int32)
    run = lambda: qwax.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[])  # noqa: E731
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / best


def start_server(path: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwax.cli", "serve", "--checkpoint", path, "--port", str(port),
                             "--max-batch", str(max_batch), "--model-name", "tiny", "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qwax serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("qwax serve did not answer /health within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny")
        build_checkpoint(path)
        reference = generate_rate(path, args.new_tokens, args.repeats)
        proc, base = start_server(path, args.max_batch)
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

            def ask(i: int) -> int:
                messages = CONVERSATION if i == 0 else [CONVERSATION[0], {"role": "user", "content": (
                    f"Write a short story about lighthouse keeper number {i}.")}]
                r = client.chat.completions.create(
                    model="tiny", messages=messages, temperature=0, max_tokens=args.new_tokens,
                    extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
                assert r.usage.completion_tokens == args.new_tokens, r.usage
                return r.usage.completion_tokens

            def batches() -> int:
                with urllib.request.urlopen(base + "/health", timeout=10) as r:
                    return json.loads(r.read())["batches"]

            def round_of(clients: int) -> float:
                before = batches()
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    total = sum(pool.map(ask, range(clients)))
                rate = total / (time.perf_counter() - start)
                print(f"  {clients} client(s): {rate:7.1f} tokens/s in {batches() - before} batch(es)")
                return rate

            for _ in range(2):  # compiles the 1-row and the batched steps
                round_of(1)
                round_of(args.max_batch)
            single = max(round_of(1) for _ in range(args.repeats))
            many = max(round_of(args.max_batch) for _ in range(args.repeats))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"qwax.generate, batch 1:           {reference:8.1f} tokens/s")
    print(f"qwax serve, 1 client:             {single:8.1f} tokens/s   ratio to qwax.generate {single / reference:.2f}"
          f"  (target >= 0.9)")
    print(f"qwax serve, {args.max_batch} concurrent clients: {many:8.1f} tokens/s   ratio to 1 client "
          f"{many / single:.2f}  (target >= 3)")


if __name__ == "__main__":
    main()
