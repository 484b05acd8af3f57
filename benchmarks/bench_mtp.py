"""Multi-token prediction end to end: train the tiny recipe with the MTP loss, then decode speculatively with it.

1. Training. `qwax.train.loop.train` runs the `tiny` recipe (the main job's model, corpus and tokenizer) with an
   MTP head (model.mtp_num_hidden_layers=1) and mtp_loss_weight > 0 for `--steps` steps. Printed: the main
   next-token loss and the MTP (token t+2) loss at the start and at the end of training, both on the training
   batches (step 1, i.e. the initial weights, vs the mean of the last 10 steps) and on the held-out documents
   (initial weights vs trained weights, same batches), with the MTP head's top-1 accuracy on the true token t+2
   and its draft agreement on held-out text (teacher-forced: how often its argmax for token t+2 equals the main
   model's, i.e. the acceptance rate speculative decoding would see on real text).
2. Decoding. On the trained model (reloaded from the run's Hugging Face export, MTP head included), prompts of
   `--prompt-len` tokens taken from held-out corpus documents are continued by `--new-tokens` tokens (batch 1,
   no early stop at eos) with plain greedy `qwax.generate` and with MTP self-speculative decoding
   (`qwax.inference.speculative.generate_mtp`). Both are compiled by a warm-up call first; then the prompts are
   timed `--repeats` times, the two methods interleaved. Printed: the MTP acceptance rate, tokens per main-model
   forward, tokens/s of both (median over the repeats of all prompts' total time), the speed-up, and whether the
   speculative tokens equal the greedy ones (they must).

    python benchmarks/bench_mtp.py [--steps 200] [--train-minutes 3] [--mtp-weight 0.3] [--prompts 4]
                                   [--prompt-len 32] [--new-tokens 128] [--repeats 3] [--workdir DIR] [key=value ...]

key=value items override the recipe (as for `qwax train`, e.g. model.hidden_size=64 learning_rate=1e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwax
from qwax import data as qdata
from qwax.cpu_allocator import keep_freed_memory_for_benchmark
from qwax.inference.speculative import generate_mtp
from qwax.train.loop import build_model, train
from qwax.train.recipes import get_recipe
from qwax.train.step import mtp_targets, token_cross_entropy


def heldout_losses(model: qwax.QwaxForCausalLM, batches: list[dict]) -> tuple[float, ...]:
    """(main next-token loss, MTP loss, MTP top-1 accuracy, draft agreement) over `batches`, token-weighted as in
    training. MTP top-1 accuracy: how often the MTP head's argmax is the true token t+2.

    Draft agreement: how often the MTP head's argmax for token t+2 (from hidden t and the true token t+1) equals
    the main model's argmax after token t+1, i.e. the acceptance rate of speculative decoding on real text.
    """
    graphdef, params = nnx.split(model)

    @jax.jit
    def terms(params, batch):
        m = nnx.merge(graphdef, params)
        out = m(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        ce, n = token_cross_entropy(out.logits, batch["targets"], batch["weights"])
        next_ids, next_targets, w = mtp_targets(batch)
        mtp_logits = m.mtp_forward(out.hidden, next_ids, position_ids=batch["position_ids"],
                                   segment_ids=batch["segment_ids"]).logits
        mtp_ce, mtp_n = token_cross_entropy(mtp_logits, next_targets, w)
        draft = jnp.argmax(mtp_logits, -1)
        agree = draft[:, :-1] == jnp.argmax(out.logits[:, 1:], -1)
        return (ce, n, mtp_ce, mtp_n, jnp.sum((draft == next_targets) * w), jnp.sum(agree * w[:, :-1]),
                jnp.sum(w[:, :-1]))

    sums = np.zeros(7)
    for b in batches:
        sums += np.asarray([float(x) for x in terms(params, b)])
    return sums[0] / sums[1], sums[2] / sums[3], sums[4] / sums[3], sums[5] / sums[6]


def main() -> None:
    print(keep_freed_memory_for_benchmark())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200, the tiny recipe's)")
    p.add_argument("--train-minutes", type=float, default=3.0,
                   help="wall-clock budget of the training run; it stops early, and says so, when the machine is "
                        "too busy to finish --steps within it (default 3; 0: none)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="mtp_loss_weight (default 0.3)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="run directory (default: a temporary one, deleted)")
    p.add_argument("items", nargs="*", metavar="key=value", help="recipe overrides")
    args = p.parse_args()

    recipe = get_recipe("tiny", [f"mtp_loss_weight={args.mtp_weight}", "model.mtp_num_hidden_layers=1",
                                 "log_every=1", "eval_every=0", f"checkpoint_every={args.steps}",
                                 f"time_budget_minutes={args.train_minutes}", *args.items])
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_mtp_")
        workdir = tmp.name
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"training recipe tiny with MTP: steps={args.steps} mtp_loss_weight={recipe.mtp_loss_weight} "
          f"overrides={list(args.items)}")

    # 1. Train with the MTP loss.
    start = time.perf_counter()
    result = train(recipe, workdir, steps=args.steps, progress=False, sample=False, verbose=False)
    train_s = time.perf_counter() - start
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "mtp_loss" in r]
    first, last = rows[0], rows[-10:]
    train_ce = (first["loss"], statistics.fmean(r["loss"] for r in last))
    train_mtp = (first["mtp_loss"], statistics.fmean(r["mtp_loss"] for r in last))

    tok = qdata.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
    eos = qdata.eos_id(tok)
    _, eval_docs = qdata.split_documents(qdata.read_documents(recipe.data, recipe.text_field),
                                         recipe.eval_holdout_every)
    evals = qdata.eval_batches(eval_docs, tok, seq_len=recipe.seq_len, batch_size=recipe.batch_size,
                               max_batches=recipe.eval_batches)
    model = qwax.load_hf(result.hf_dir)
    assert model.config.mtp_num_hidden_layers == 1, "the export lost the MTP head"
    init_model = build_model(recipe, tok.get_vocab_size(), eos)  # the run's initial weights (same seed)
    held_start = heldout_losses(init_model, evals)
    held_end = heldout_losses(model, evals)
    del init_model

    print(f"\ntrained {result.step} of {args.steps} steps in {train_s:.0f} s (compile included), "
          f"{result.tokens_per_sec:,.0f} tokens/s")
    print(f"{'loss (nats/token)':<34}{'start':>9}{'end':>9}")
    print(f"{'main next-token, train batches':<34}{train_ce[0]:>9.3f}{train_ce[1]:>9.3f}")
    print(f"{'MTP (token t+2), train batches':<34}{train_mtp[0]:>9.3f}{train_mtp[1]:>9.3f}")
    print(f"{'main next-token, held-out':<34}{held_start[0]:>9.3f}{held_end[0]:>9.3f}")
    print(f"{'MTP (token t+2), held-out':<34}{held_start[1]:>9.3f}{held_end[1]:>9.3f}")
    print(f"{'MTP top-1 accuracy, held-out':<34}{held_start[2]:>9.1%}{held_end[2]:>9.1%}")
    print(f"{'MTP draft agreement, held-out':<34}{held_start[3]:>9.1%}{held_end[3]:>9.1%}")
    print("(train: step 1 vs mean of the last 10 steps; held-out: initial vs trained weights; draft agreement: MTP "
          "argmax for t+2 == main argmax for t+2, teacher-forced)")

    # 2. Speculative decoding with the trained head vs plain greedy.
    docs = [d for d in qdata.tokenize_documents(eval_docs, tok) if len(d) >= args.prompt_len]
    if len(docs) < args.prompts:
        raise SystemExit(f"only {len(docs)} held-out documents have {args.prompt_len} tokens")
    pick = np.linspace(0, len(docs) - 1, args.prompts).astype(int)
    prompts = [np.asarray(docs[i][:args.prompt_len], np.int32)[None] for i in pick]
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=[])  # no early stop: every call makes new_tokens

    qwax.generate(model, prompts[0], **kw)  # warm-up: compiles prefill and decode
    generate_mtp(model, prompts[0], **kw)  # warm-up: compiles prefill, MTP step and verify
    t_plain, t_mtp, same = [], [], True
    drafts = accepted = forwards = 0
    for r in range(args.repeats):
        tp = tm = 0.0
        for ids in prompts:
            s = time.perf_counter()
            plain = qwax.generate(model, ids, **kw)
            tp += time.perf_counter() - s
            stats: dict = {}
            s = time.perf_counter()
            spec = generate_mtp(model, ids, stats=stats, **kw)
            tm += time.perf_counter() - s
            same &= plain.shape == spec.shape and bool(np.array_equal(plain, spec))
            if r == 0:
                drafts, accepted = drafts + stats["drafts"], accepted + stats["accepted"]
                forwards += stats["main_forwards"]
        t_plain.append(tp)
        t_mtp.append(tm)
    new = args.prompts * args.new_tokens
    plain_tps, mtp_tps = new / statistics.median(t_plain), new / statistics.median(t_mtp)
    # main forwards of speculative decoding: the prefill's, then one per verify; greedy: one per token after the first.
    print(f"\nspeculative decoding: {args.prompts} held-out prompts x {args.prompt_len} tokens -> "
          f"{args.new_tokens} new tokens each, batch 1, median of {args.repeats} repeats")
    print(f"{'MTP acceptance rate':<34}{accepted / max(drafts, 1):>9.1%}   ({accepted}/{drafts} drafts)")
    print(f"{'new tokens per main forward':<34}{(new - args.prompts) / max(forwards, 1):>9.2f}"
          f"   (greedy: 1.00)")
    print(f"{'greedy tokens/s':<34}{plain_tps:>9.1f}")
    print(f"{'MTP speculative tokens/s':<34}{mtp_tps:>9.1f}")
    print(f"{'speed-up':<34}{mtp_tps / plain_tps:>8.2f}x")
    print(f"{'tokens identical to greedy':<34}{'yes' if same else 'NO':>9}")
    text = tok.decode([int(t) for t in spec[0, args.prompt_len:]], skip_special_tokens=False)
    print(f"distinct tokens among the last prompt's {args.new_tokens} new ones: {len(set(spec[0, args.prompt_len:]))}; "
          f"they read: {text[:160]!r}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if tmp is not None:
        tmp.cleanup()
    if not same:
        raise SystemExit("speculative decoding differs from greedy decoding")


if __name__ == "__main__":
    main()
