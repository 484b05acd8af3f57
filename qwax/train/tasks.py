"""What a run trains on, per recipe task: the tokenizer, the training batches and the held-out batches.

  lm   packed documents (qwax.data.train_batches), every token a target; the tokenizer is trained here unless
       the recipe names one.
  sft  conversations rendered with the chat template (qwax.data.sft_batches): only the assistant's tokens are
       targets; the tokenizer and, by default, the template are the starting checkpoint's.
  dpo  preference pairs (qwax.data.dpo_batches): each micro-batch holds B chosen rows then the B rejected rows
       of the same pairs.

Post-training starts from a checkpoint: `resolve_recipe` fills in `init_from` (the main job's export when the
recipe leaves it empty) and the tokenizer, or says what to pass.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from qwax import data as qdata
from qwax.inference.chat_template import ChatTemplate, ChatTemplateError, load_special_tokens
from qwax.train.recipes import Recipe

# Where `qwax train` (the main job, default --workdir qwax-run) exports its model.
MAIN_JOB_EXPORT = os.path.join("qwax-run", "hf")
# Files of a checkpoint that are not weights or config, copied into post-training exports.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class DataError(ValueError):
    """The run's data or chat template cannot be used (the message says which and why)."""


def resolve_recipe(recipe: Recipe) -> Recipe:
    """The recipe with post-training defaults made explicit: `init_from` (sft / dpo: the main job's export
    ./qwax-run/hf when the recipe names none) and `tokenizer` ("init_from" for sft / dpo)."""
    if recipe.task == "lm":
        return recipe
    init_from = recipe.init_from
    if not init_from:
        if not os.path.isfile(os.path.join(MAIN_JOB_EXPORT, "config.json")):
            raise DataError(f"recipe {recipe.name!r} fine-tunes a checkpoint: pass init_from=DIR (a Hugging Face "
                            f"checkpoint directory with config.json, safetensors and tokenizer.json), or run the "
                            f"main job first (`qwax train tiny`), whose export {MAIN_JOB_EXPORT}/ is the default")
        init_from = MAIN_JOB_EXPORT
    init_from = os.path.abspath(init_from)
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        raise DataError(f"init_from={init_from!r}: not a Hugging Face checkpoint directory (no config.json)")
    return dataclasses.replace(recipe, init_from=init_from, tokenizer=recipe.tokenizer or "init_from")


def load_template(recipe: Recipe) -> ChatTemplate:
    """The chat template that renders the run's records (see Recipe.chat_template)."""
    source = recipe.chat_template
    try:
        special = load_special_tokens(recipe.init_from) if recipe.init_from else {}
        if source in ("", "init_from"):
            template = ChatTemplate.from_checkpoint(recipe.init_from)
        elif source == "qwax":
            template = ChatTemplate(qdata.chat_template(), special_tokens=special)
        elif os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                template = ChatTemplate(f.read(), special_tokens=special)
        else:
            raise DataError(f"chat_template={source!r}: expected '' (the checkpoint's), 'qwax' or a .jinja file")
    except (ChatTemplateError, OSError) as e:
        raise DataError(f"chat template for recipe {recipe.name!r}: {e}; pass chat_template=qwax (qwax's Qwen3.5 "
                        f"template) or chat_template=FILE.jinja") from None
    if not template.has_generation_blocks:
        raise DataError(f"the chat template of {recipe.init_from if source in ('', 'init_from') else source!r} has "
                        "no {% generation %} blocks, so the assistant's tokens cannot be told apart for the loss; "
                        "pass chat_template=qwax (qwax's Qwen3.5 template, which has them) or a template of your own")
    return template


@dataclass
class TaskData:
    """The data side of a run."""

    tokenizer: Any
    template: ChatTemplate | None  # sft / dpo
    batches: Iterator[dict]  # grain iterator of [grad_accum, rows, seq_len] batches (checkpointable)
    evals: list[dict]  # fixed held-out batches of [rows, seq_len]
    rows: int  # rows per micro-batch per process (2 x batch_size for dpo: chosen, then rejected)
    n_train: int  # training documents / conversations / pairs
    entropy: float | None  # lm: unigram entropy of the training tokens (nats/token)
    skipped: Counter  # sft / dpo: malformed records skipped, by reason

    def describe(self, task: str) -> str:
        noun = {"lm": "training documents", "sft": "training conversations", "dpo": "training pairs"}[task]
        text = f"{self.n_train} {noun}"
        if self.skipped:
            text += f" ({sum(self.skipped.values())} records skipped: " + \
                    ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) + ")"
        return text


def prepare_data(recipe: Recipe, workdir: str, tokenizer_for, process_index: int, process_count: int) -> TaskData:
    """Tokenizer, training iterator and held-out batches of `recipe` (resolved by resolve_recipe).

    tokenizer_for(recipe, workdir, train_docs) -> the run's tokenizer (qwax.train.loop.load_tokenizer_for).
    """
    shard = {"process_index": process_index, "process_count": process_count}
    shape = {"seq_len": recipe.seq_len, "batch_size": recipe.batch_size}
    if recipe.task == "lm":
        docs = qdata.read_documents(recipe.data, recipe.text_field)
        train_docs, eval_docs = qdata.split_documents(docs, recipe.eval_holdout_every)
        tok = tokenizer_for(recipe, workdir, train_docs)
        entropy = qdata.unigram_entropy(qdata.tokenize_documents(train_docs, tok), tok.get_vocab_size())
        batches = qdata.train_batches(train_docs, tok, grad_accum=recipe.grad_accum, seed=recipe.seed, **shape,
                                      **shard)
        evals = (qdata.eval_batches(eval_docs, tok, max_batches=recipe.eval_batches, **shape, **shard)
                 if eval_docs and recipe.eval_batches > 0 else [])
        return TaskData(tok, None, iter(batches), evals, recipe.batch_size, len(train_docs), entropy, Counter())

    tok = tokenizer_for(recipe, workdir, [])
    template = load_template(recipe)
    if recipe.task == "sft":
        read, make_batches, make_evals = qdata.read_conversations, qdata.sft_batches, qdata.sft_eval_batches
    else:
        read, make_batches, make_evals = qdata.read_preferences, qdata.dpo_batches, qdata.dpo_eval_batches
    try:
        records, skipped = read(recipe.data, on_error=recipe.on_bad_record)
    except ValueError as e:
        raise DataError(f"{e} (on_bad_record=skip skips such records and counts them)") from None
    train_records, eval_records = qdata.split_documents(records, recipe.eval_holdout_every)
    common = {"on_error": recipe.on_bad_record, "skipped": skipped}
    try:
        batches = make_batches(train_records, template, tok, grad_accum=recipe.grad_accum, seed=recipe.seed,
                               **shape, **shard, **common)
        evals = (make_evals(eval_records, template, tok, max_batches=recipe.eval_batches, **shape, **shard,
                            **common) if eval_records and recipe.eval_batches > 0 else [])
    except ValueError as e:
        raise DataError(f"{e} (on_bad_record=skip skips such records and counts them)") from None
    rows = recipe.batch_size * (2 if recipe.task == "dpo" else 1)
    return TaskData(tok, template, iter(batches), evals, rows, len(train_records), None, skipped)


def copy_tokenizer_files(source: str, destination: str, template: ChatTemplate | None = None) -> None:
    """Copy the tokenizer, chat template and generation config files of checkpoint `source` into `destination`;
    `template` (when given and not the checkpoint's own) is written as chat_template.jinja."""
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(destination, name))
    if template is not None:
        with open(os.path.join(destination, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template.source)
