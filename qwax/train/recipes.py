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
from qwax.options import OPTION_NAMES, RunOptions


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
    init_from: str = ""  # an HF checkpoint directory to continue from (SFT / continued pretraining); "" = random
    # Data: files, directories or "default" (the embedded corpus); see qwax.data.sources.
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
    sample_prompt: str = "def "
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
    # Continued pretraining / SFT of Qwen3.5-0.8B on one accelerator host (e.g. TPU v5e-8 or 8 GPUs): point
    # init_from at the converted checkpoint and data at jsonl/parquet files; the checkpoint's tokenizer is used.
    "qwen3.5-0.8b": Recipe(
        name="qwen3.5-0.8b", preset="qwen3.5-0.8b",
        options_overrides={"dtype": "bfloat16", "param_dtype": "float32", "remat": "dots_no_batch"},
        tokenizer="init_from", data=("default",), seq_len=4096, batch_size=8, grad_accum=4, steps=2000,
        learning_rate=2e-5, warmup_steps=100, end_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
        mtp_loss_weight=0.3, checkpoint_every=500, keep_checkpoints=3, eval_every=250, eval_batches=16,
        log_every=10, mesh="data=1,fsdp=8,tensor=1", sharding_strategy="fsdp"),
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
