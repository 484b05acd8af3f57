"""Training recipes: a frozen `Recipe` dataclass and the named recipes `qwax train NAME` runs.

A recipe fixes everything a run needs: the model (a preset plus config field overrides, and how it runs: dtypes,
kernels, layer scan, remat), data, tokenizer, batch shape, optimizer, losses, checkpointing, logging and the device
mesh. `qwax train NAME key=value ...` overrides any recipe field, and:

  model.FIELD=value    a QwaxConfig field (`model_overrides`, e.g. `model.hidden_size=256`), or a RunOptions field
                       (any of qwax.options.OPTION_NAMES: dtype, param_dtype, remat, scan_layers, gdn_chunk_size,
                       the *_impl kernel choices), which goes to `options_overrides` (e.g. `model.remat=full`);
  options.FIELD=value  a RunOptions field, explicitly (e.g. `options.scan_layers=false`,
                       `options.gdn_chunk_size=none` for the per-backend default).

`recipe.model_config()` is the QwaxConfig (what a checkpoint holds), `recipe.run_options()` the qwax.RunOptions.

The recipes live in the package so that `qwax train tiny` works from an installed wheel; `recipes/` in the
repository holds their documentation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from qwax.config import QwaxConfig, get_preset
from qwax.layers.lora import LoRAConfig
from qwax.options import OPTION_NAMES, RunOptions


TASKS = ("lm", "sft", "dpo")


@dataclass(frozen=True)
class Recipe:
    """Everything a training run needs (see the field comments); `qwax train NAME key=value ...` overrides fields."""

    name: str
    # Model: a preset of qwax.config.PRESETS plus QwaxConfig field overrides. The vocabulary size follows the
    # tokenizer when the tokenizer is trained here (vocab_size below), else the preset's.
    preset: str = "tiny-moe"
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    # How the model runs: qwax.RunOptions fields (dtype, param_dtype, remat, scan_layers, gdn_chunk_size, the
    # *_impl kernel choices); unset ones keep the RunOptions defaults.
    options_overrides: Mapping[str, Any] = field(default_factory=dict)
    # An HF checkpoint directory to start from (continued pre-training, SFT, DPO); "" = random init for
    # task "lm", and for "sft" / "dpo" the main job's export ./qwax-run/hf when it exists.
    init_from: str = ""
    # What is trained (docs/post_training.md): "lm" next-token loss on packed documents; "sft" supervised fine-tuning
    # on conversations, the loss on the assistant's tokens only; "dpo" preference pairs (direct preference
    # optimization against the frozen starting model).
    task: str = "lm"
    # Data: files, directories or "default" (the embedded corpus); see qwax.data.sources.
    # "default" is the embedded set of the task: the corpus (lm), conversations (sft) or preference pairs (dpo).
    data: tuple[str, ...] = ("default",)
    text_field: str = "text"
    tokenizer: str = ""  # "" trains a byte-level BPE of `vocab_size` on the data; else a tokenizer.json / checkpoint
    vocab_size: int = 2048
    eval_holdout_every: int = 50  # every n-th document is held out for evaluation (0: no eval set)
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1
    # Optimizer.
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # Losses (the MoE aux loss coefficient comes from the model config's router_aux_loss_coef).
    z_loss_coef: float = 0.0
    mtp_loss_weight: float = 0.0
    dpo_beta: float = 0.1  # dpo: the temperature of the implicit reward beta * log(pi / pi_ref)
    # sft / dpo data: the chat template renders the records ("" = init_from's own; "qwax" = qwax's Qwen3.5
    # template; or a .jinja file); it must mark assistant turns with {% generation %} blocks for the loss mask.
    chat_template: str = ""
    on_bad_record: str = "error"  # "error": stop at a malformed record, naming it; "skip": skip and count it
    # LoRA (qwax.lora): lora_rank > 0 trains low-rank adapters with the base frozen; 0 trains every parameter.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # HF module names; () = qwax.layers.lora.DEFAULT_TARGETS; "experts" too
    lora_dropout: float = 0.0
    use_rslora: bool = False
    # Checkpoints, logs, evaluation, sample.
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    # Wall-clock budget of the whole run in minutes (0: none). When the next step would overrun it, training stops
    # early with a final checkpoint (and says so); the main job uses it to finish in time on a busy machine.
    time_budget_minutes: float = 0.0
    peak_flops: float = 0.0  # per device, FLOP/s; 0: metrics.peak_flops() (measured on the CPU, published on TPU/GPU)
    sample_prompt: str = "def "  # lm: text to continue; sft / dpo: a user message, rendered as a chat prompt
    sample_tokens: int = 48
    # Parallelism: a mesh spec "axis=size,..." for qwax.sharding (e.g. "data=1,fsdp=64,expert=8,tensor=1") and a
    # named sharding strategy. "" runs on one device with no mesh.
    mesh: str = ""
    sharding_strategy: str = ""

    def __post_init__(self) -> None:
        misplaced = sorted(OPTION_NAMES & set(self.model_overrides))
        if misplaced:
            raise ValueError(f"recipe {self.name!r}: model_overrides {misplaced} are run options, not QwaxConfig "
                             "fields: put them in options_overrides")
        unknown = sorted(set(self.options_overrides) - OPTION_NAMES)
        if unknown:
            raise ValueError(f"recipe {self.name!r}: options_overrides {unknown} are not RunOptions fields; "
                             f"expected some of {sorted(OPTION_NAMES)}")
        self.run_options()  # invalid values fail here, naming the option
        choices = {"task": (self.task, TASKS), "on_bad_record": (self.on_bad_record, ("error", "skip"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"recipe {self.name!r}: {key}={value!r}; expected one of {list(allowed)}")
        if self.lora_rank < 0:
            raise ValueError(f"recipe {self.name!r}: lora_rank={self.lora_rank}; expected >= 0 (0: no LoRA)")
        if self.lora_rank:
            self.lora_config()  # invalid LoRA settings fail here

    def lora_config(self) -> LoRAConfig | None:
        """The adapters of the run (None: full training)."""
        if not self.lora_rank:
            return None
        targets = {"targets": tuple(self.lora_targets)} if self.lora_targets else {}
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          use_rslora=self.use_rslora, **targets)

    def run_options(self) -> RunOptions:
        """The qwax.RunOptions of the run: RunOptions defaults with `options_overrides`."""
        return RunOptions(**self.options_overrides)

    def model_config(self, vocab_size: int | None = None) -> QwaxConfig:
        """The model config: the preset with `model_overrides`, and `vocab_size` when given."""
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        if self.init_from:
            return QwaxConfig.from_hf(self.init_from, **{k: v for k, v in overrides.items() if k != "vocab_size"})
        return get_preset(self.preset, **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=list)


RECIPES: dict[str, Recipe] = {
    # The main job: a small Qwen3.5-MoE-shaped model (3 Gated DeltaNet + 1 gated attention layer, 8 experts top-2)
    # on the embedded corpus; a few minutes on 2 CPU cores, compile included.
    "tiny": Recipe(
        name="tiny", preset="tiny-moe",
        model_overrides={"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 2,
                         "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                         "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                         "shared_expert_intermediate_size": 128, "mrope_section": (2, 2, 0),
                         "max_position_embeddings": 4096},
        vocab_size=2048, seq_len=256, batch_size=8, steps=200, learning_rate=3e-3, warmup_steps=20,
        checkpoint_every=50, eval_every=100, log_every=10, time_budget_minutes=7.5),
    # Continued pretraining of Qwen3.5-0.8B on one accelerator host (e.g. TPU v5e-8 or 8 GPUs): point
    # init_from at the converted checkpoint and data at jsonl/parquet files; the checkpoint's tokenizer is used.
    "qwen3.5-0.8b": Recipe(
        name="qwen3.5-0.8b", preset="qwen3.5-0.8b",
        options_overrides={"dtype": "bfloat16", "param_dtype": "float32", "remat": "dots_no_batch"},
        tokenizer="init_from", data=("default",), seq_len=4096, batch_size=8, grad_accum=4, steps=2000,
        learning_rate=2e-5, warmup_steps=100, end_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
        mtp_loss_weight=0.3, checkpoint_every=500, keep_checkpoints=3, eval_every=250, eval_batches=16,
        log_every=10, mesh="data=1,fsdp=8,tensor=1", sharding_strategy="fsdp"),
    # Post-training (docs/post_training.md). LoRA SFT of a checkpoint on the embedded conversations: init_from
    # defaults to the main job's export ./qwax-run/hf; a few minutes on 2 CPU cores.
    "sft-tiny": Recipe(
        name="sft-tiny", task="sft", tokenizer="init_from", seq_len=640, batch_size=4, steps=100,
        learning_rate=5e-3, warmup_steps=10, weight_decay=0.0, lora_rank=8, lora_alpha=16.0,
        eval_holdout_every=20, eval_every=50, eval_batches=4, checkpoint_every=50, log_every=5,
        sample_prompt="What does json.dumps do?", sample_tokens=48),
    # DPO of a checkpoint (e.g. the sft-tiny export) on the embedded preference pairs, with LoRA.
    "dpo-tiny": Recipe(
        name="dpo-tiny", task="dpo", tokenizer="init_from", seq_len=384, batch_size=4, steps=100,
        learning_rate=2e-3, warmup_steps=10, weight_decay=0.0, lora_rank=8, lora_alpha=16.0, dpo_beta=0.1,
        eval_holdout_every=20, eval_every=50, eval_batches=16, checkpoint_every=50, log_every=5,
        sample_prompt="What does json.dumps do?", sample_tokens=48),
    # LoRA SFT of Qwen3.5-0.8B on one TPU v5e-8 host (or 8 GPUs): init_from the converted checkpoint, data the
    # conversations (jsonl / parquet, OpenAI messages). Qwen's own chat template has no {% generation %} blocks,
    # so qwax's Qwen3.5 template renders the data (the same ChatML, think and tool-call format).
    "qwen3.5-0.8b-sft": Recipe(
        name="qwen3.5-0.8b-sft", preset="qwen3.5-0.8b", task="sft", chat_template="qwax",
        options_overrides={"dtype": "bfloat16", "param_dtype": "float32", "remat": "dots_no_batch"},
        tokenizer="init_from", seq_len=4096, batch_size=8, grad_accum=2, steps=1000, learning_rate=2e-4,
        warmup_steps=50, end_lr_ratio=0.1, weight_decay=0.0, clip_norm=1.0, lora_rank=16, lora_alpha=32.0,
        checkpoint_every=250, keep_checkpoints=3, eval_every=250, eval_batches=16, log_every=10,
        mesh="data=1,fsdp=8,tensor=1", sharding_strategy="fsdp", on_bad_record="skip"),
    # Qwen3.5-397B-A17B pretraining on a TPU pod (512 chips: fsdp 64 x expert 8). Global batch 1024 x 4096 tokens.
    "qwen3.5-397b-a17b": Recipe(
        name="qwen3.5-397b-a17b", preset="qwen3.5-397b-a17b",
        options_overrides={"dtype": "bfloat16", "param_dtype": "float32", "remat": "full"},
        tokenizer="", vocab_size=248320, seq_len=4096, batch_size=2, grad_accum=1, steps=500_000,
        learning_rate=2e-4, warmup_steps=2000, end_lr_ratio=0.1, weight_decay=0.1, b2=0.95, clip_norm=1.0,
        z_loss_coef=1e-3, mtp_loss_weight=0.3, checkpoint_every=1000, keep_checkpoints=3, eval_every=1000,
        eval_batches=32, log_every=10, mesh="data=1,fsdp=64,expert=8,tensor=1", sharding_strategy="fsdp_ep"),
}


def _parse_value(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, int):
        return int(float(text)) if "e" in text.lower() else int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, tuple):
        return tuple(_parse_value(t, like[0]) if like else t for t in text.split(",") if t)
    if like is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _parse_option(name: str, text: str) -> Any:
    """A RunOptions value from its command-line text (validated by RunOptions itself)."""
    if name == "scan_layers":
        return _parse_value(text, True)
    if name == "gdn_chunk_size":
        if text.lower() in ("none", "null", "auto", "default", ""):
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected a positive int, or none for the per-backend default; got {text!r}") from None
    return text  # dtype, kernel (*_impl) and remat names


def parse_model_override(item: str, base: Mapping[str, Any] | QwaxConfig | None = None) -> tuple[str, Any]:
    """`model.FIELD=value` (a QwaxConfig or a RunOptions field) or `options.FIELD=value` (a RunOptions field) ->
    (FIELD, value).

    Config values are typed like `base`'s FIELD (a config, or a dict of fields; fields missing from a dict fall
    back to the QwaxConfig default); run options by their RunOptions type. Route the pairs with
    `qwax.options.split_overrides` (or `name in OPTION_NAMES`).
    """
    key, sep, text = item.partition("=")
    prefix, dot, name = key.partition(".")
    if not sep or not dot or prefix not in ("model", "options"):
        raise ValueError(f"override {item!r}: expected model.FIELD=value or options.FIELD=value "
                         "(e.g. model.hidden_size=256, options.remat=full)")
    config_fields = {f.name for f in dataclasses.fields(QwaxConfig)}
    if name in OPTION_NAMES:
        try:
            return name, _parse_option(name, text)
        except ValueError as e:
            raise ValueError(f"override {key}={text!r}: {e}") from None
    if prefix == "options":
        raise ValueError(f"override {key!r}: RunOptions has no field {name!r}; fields: {sorted(OPTION_NAMES)}")
    if name not in config_fields:
        raise ValueError(f"override {key!r}: QwaxConfig has no field {name!r} (and RunOptions none of that name)")
    if isinstance(base, Mapping):
        like = base.get(name, getattr(QwaxConfig(), name))
    else:
        like = None if base is None else getattr(base, name)
    try:
        return name, _parse_value(text, like)
    except ValueError as e:
        raise ValueError(f"override {key}={text!r}: {e}") from None


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`key=value` strings applied to a recipe: recipe fields, `model.FIELD=value` (config fields, and run options
    routed to options_overrides) and `options.FIELD=value` (run options)."""
    changes: dict[str, Any] = {}
    model = dict(recipe.model_overrides)
    options = dict(recipe.options_overrides)
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    base_cfg = recipe.model_config() if not recipe.init_from else None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. steps=100 or model.hidden_size=256)")
        key, text = item.split("=", 1)
        if key.startswith(("model.", "options.")):
            name, value = parse_model_override(item, base_cfg)
            (options if name in OPTION_NAMES else model)[name] = value
        elif key in ("name", "model_overrides", "options_overrides"):
            raise ValueError(f"override {key!r}: not settable on the command line; use model.FIELD=value for "
                             "config fields and options.FIELD=value for run options (or name another recipe)")
        elif key in fields:
            try:
                changes[key] = _parse_value(text, getattr(recipe, key))
            except ValueError as e:
                raise ValueError(f"override {key}={text!r}: {e}") from None
        else:
            raise ValueError(f"override {key!r}: Recipe has no field {key!r}; fields: {sorted(fields)}")
    return dataclasses.replace(recipe, model_overrides=model, options_overrides=options, **changes)


def get_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """The named recipe of RECIPES with `key=value` overrides (see `apply_overrides`)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    return apply_overrides(RECIPES[name], list(overrides or []))
