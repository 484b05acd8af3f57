"""PEFT LoRA adapter directories <-> qwax adapters: `save_peft`, `load_peft`.

A PEFT adapter directory holds `adapter_config.json` (a peft LoraConfig) and `adapter_model.safetensors`, whose
keys are `base_model.model.<torch module name>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; PEFT adds
s * B A to the torch weight [out, in], s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), r and alpha
per module from rank_pattern / alpha_pattern. qwax kernels are [in, out], so qwax's A [in, r] is lora_A.weight
transposed and B [r, out] is lora_B.weight transposed.

Routed experts are nn.Parameters in transformers ([E, 2I, H] gate_up_proj and [E, H, I] down_proj of the
`mlp.experts` module), adapted with `target_parameters` through PEFT's ParamWrapper: lora_A.weight is
[r*E, in], expert e's rows e*r ... e*r + r - 1 (a reshape to [E, r, in]); lora_B.weight is [out, r*E], expert
e's columns e, E + e, ... (a reshape to [out, r, E]); since the experts module is not `is_transposed`, PEFT takes
in = H, out = 2I for gate_up (and in = I, out = H for down), i.e. the same in/out as the experts compute.
PEFT wraps the two parameters of one module in nested ParamWrappers, processed in the module's parameter order:
the inner one (gate_up, when both are adapted) is under `mlp.experts.base_layer`, the outer one (down) under
`mlp.experts`. save_peft names targets by their last two components ("shared_expert.gate_proj"), since PEFT
reads a bare "gate_proj" on Qwen3-Next as transformers v4's per-expert projection and would adapt the routed
experts too. Only JSON and safetensors are read or written; torch and peft are not imported.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from qwax.convert.keymap import MULTIMODAL_TEXT_PREFIX, TEXT_PREFIX
from qwax.convert.safetensors_io import (
    SINGLE_FILE,
    CheckpointError,
    CheckpointReader,
    atomic_directory,
    write_checkpoint,
)
from qwax.layers.lora import KNOWN_TARGETS, LoRAConfig
from qwax.lora import (
    DOWN,
    GATE_UP,
    LINEAR,
    AdapterKey,
    AdapterSite,
    Model,
    adapter_sites,
    attach_lora,
    has_lora,
    lora_config_of,
    lora_modules,
    set_lora_values,
)

__all__ = ["save_peft", "load_peft", "CONFIG_FILE", "WEIGHTS_FILE", "PeftError"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_EXPERT_PARAM = {GATE_UP: "gate_up_proj", DOWN: "down_proj"}
_BASE_LAYER = ".base_layer"

# LoraConfig fields whose non-default values change the forward in ways qwax does not implement: value when off.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
    "layer_replication": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
    "use_qalora": False, "use_bdlora": None, "velora_config": None, "kasa_config": None, "arrow_config": None,
    "monteclora_config": None,
}


class PeftError(CheckpointError):
    """A PEFT adapter directory qwax cannot read, or an adapter it cannot represent."""


# ------------------------------------------------------------------------------------------------------- save
def _plain(x: float) -> int | float:
    """A number as JSON writes it best: an int when integral (PEFT's lora_alpha is typed int)."""
    x = float(f"{x:.12g}")  # alpha recovered from the scaling: drop float noise
    return int(x) if x.is_integer() else x


def _alpha(scaling: float, rank: int, use_rslora: bool) -> int | float:
    return _plain(scaling * (math.sqrt(rank) if use_rslora else rank))


def _expert_module(site: AdapterSite) -> str:
    """Torch module name of an expert site: "model.layers.0.mlp.experts"."""
    return site.hf_name.rpartition(".")[0]


def _short_name(site: AdapterSite) -> str:
    """The last two components of a Linear's torch name ("self_attn.q_proj", "shared_expert.gate_proj"), the
    last three of an expert parameter's ("mlp.experts.gate_up_proj"): what PEFT matches as a suffix.

    Two, not one: for checkpoints transformers v5 converts from v4 MoE layouts (Qwen3-Next), PEFT reads a bare
    "gate_proj" / "up_proj" / "down_proj" target as the v4 per-expert projections, adds the fused expert stacks to
    target_parameters and doubles their rank; "shared_expert.gate_proj" or "mlp.gate_proj" is left alone.
    """
    return ".".join(site.hf_name.split(".")[-2 if site.part == LINEAR else -3:])


def _names(chosen: list[AdapterSite], sites: list[AdapterSite]) -> list[str]:
    """Names for PEFT's suffix matching (`name == t or name.endswith("." + t)`) that select exactly `chosen`
    among `sites`: the short name where every site bearing it is chosen, else the full names."""
    chosen_names = {s.hf_name for s in chosen}
    out: list[str] = []
    for short in dict.fromkeys(_short_name(s) for s in chosen):
        bearing = [s.hf_name for s in sites if _short_name(s) == short]
        out += [short] if set(bearing) <= chosen_names else [n for n in bearing if n in chosen_names]
    return out


def _pattern(values: dict[AdapterSite, Any], sites: list[AdapterSite]) -> dict[str, Any]:
    """A PEFT rank_pattern / alpha_pattern giving `values` (site -> value) to their sites among the adapted
    `sites`: a short name where all sites bearing it have the same value, else full names (PEFT matches the keys
    as regexes ending the name after a dot)."""
    pattern: dict[str, Any] = {}
    for short in dict.fromkeys(_short_name(s) for s in values):
        bearing = [s for s in sites if _short_name(s) == short]
        if all(s in values for s in bearing) and len({values[s] for s in bearing}) == 1:
            pattern[short] = values[bearing[0]]
        else:
            pattern.update({s.hf_name: values[s] for s in bearing if s in values})
    return pattern


def save_peft(model: Model, path: str | os.PathLike, *, base_model_name_or_path: str = "",
              overwrite: bool = False) -> str:
    """Write the model's LoRA adapters as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors, tensors in the adapters' dtype) that `peft.PeftModel.from_pretrained` applies to
    the transformers model of the base checkpoint. The directory appears only when complete (with `overwrite`,
    an existing one stays whole until then). Returns the path.

    Modules whose rank or alpha differ from the model's LoRAConfig (e.g. loaded with load_peft) get
    rank_pattern / alpha_pattern entries. Raises ValueError for a model without adapters.
    """
    config = lora_config_of(model)
    if config is None:
        raise ValueError("save_peft: the model has no LoRA adapters (qwax.apply_lora or qwax.load_peft first)")
    adapters = lora_modules(model)
    sites = adapter_sites(model)
    adapted = [s for s in sites if s.key in adapters]
    if {s.key for s in adapted} != set(adapters):
        missing = sorted(set(adapters) - {s.key for s in adapted})
        raise ValueError(f"save_peft: adapters on {missing[0]} have no PEFT name (not a decoder-layer Linear or "
                         "routed-expert stack)")
    experts_in: dict[tuple[str, tuple[int, ...]], set[str]] = {}
    for s in adapted:
        if s.part != LINEAR:
            experts_in.setdefault((_expert_module(s), s.group), set()).add(s.part)

    tensors: dict[str, np.ndarray] = {}
    ranks: dict[AdapterSite, int] = {}
    alphas: dict[AdapterSite, int | float] = {}
    for s in adapted:
        adapter = adapters[s.key]
        a = np.asarray(adapter.lora_a.get_value()[s.group])  # [*stack, in, r]
        b = np.asarray(adapter.lora_b.get_value()[s.group])  # [*stack, r, out]
        if s.part == LINEAR:
            name = s.hf_name
            lora_a, lora_b = a.T, b.T  # [r, in], [out, r]
        else:
            module = _expert_module(s)
            nested = s.part == GATE_UP and experts_in[(module, s.group)] == {GATE_UP, DOWN}
            name = module + (_BASE_LAYER if nested else "")
            e, i, r = a.shape
            lora_a = a.transpose(0, 2, 1).reshape(e * r, i)  # row e*r + j = expert e, rank j
            lora_b = b.transpose(2, 1, 0).reshape(b.shape[2], r * e)  # column j*E + e
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
        if adapter.rank != config.rank:
            ranks[s] = adapter.rank
        alpha = _alpha(adapter.scaling, adapter.rank, config.use_rslora)
        if alpha != _plain(config.alpha):
            alphas[s] = alpha

    linear = [s for s in adapted if s.part == LINEAR]
    experts = [s for s in adapted if s.part != LINEAR]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": config.rank,
        "lora_alpha": _plain(config.alpha),
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": _names(linear, [s for s in sites if s.part == LINEAR]) or None,
        "target_parameters": _names(experts, [s for s in sites if s.part != LINEAR]) or None,
        "rank_pattern": _pattern(ranks, adapted),
        "alpha_pattern": _pattern(alphas, adapted),
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_bias": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "inference_mode": True,
        "revision": None,
    }
    path = os.fspath(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(adapter_config, f, indent=2)
        write_checkpoint(tmp, sorted(tensors.items()))
        os.replace(os.path.join(tmp, SINGLE_FILE), os.path.join(tmp, WEIGHTS_FILE))
    return path


# ------------------------------------------------------------------------------------------------------- load
def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern lookup (peft.utils.other.get_pattern_key): the first key k with name matching
    `(.*\\.)?(k)$`, else the default."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _canonical(name: str) -> str:
    """A torch module name with the multimodal text prefix folded to the text one, so an adapter made on
    Qwen3_5ForCausalLM loads into QwaxForConditionalGeneration's language model and back."""
    return TEXT_PREFIX + name[len(MULTIMODAL_TEXT_PREFIX):] if name.startswith(MULTIMODAL_TEXT_PREFIX) else name


def _read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise PeftError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter directory")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise PeftError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftError(f"{file}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise PeftError(f"{file}: peft_type={config.get('peft_type')!r}; qwax loads LoRA adapters only ('LORA')")
    if config.get("bias", "none") != "none":
        raise PeftError(f"{file}: bias={config['bias']!r}; qwax layers have no biases (expected 'none')")
    for field, off in _UNSUPPORTED.items():
        value = config.get(field, off)
        if value not in (off, None, False, [], {}):
            raise PeftError(f"{file}: {field}={value!r} is not supported by qwax (expected {off!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            raise PeftError(f"{file}: {field}={config.get(field)!r}; expected a number")
    return config


def _parse_key(key: str, file: str) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> (module name without PEFT's base_layer nesting, 'A' | 'B')."""
    m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
    if m is None:
        raise PeftError(f"{file}: tensor {key!r} is not a LoRA lora_A / lora_B weight qwax can load (DoRA "
                        "magnitudes, embedding adapters, biases and modules_to_save are not supported)")
    return m.group(1), m.group(2)


def load_peft(model: Model, path: str | os.PathLike) -> Model:
    """Attach the LoRA adapter of PEFT directory `path` (made by qwax.save_peft or by peft in PyTorch) to
    `model`, in place, and return it.

    Which modules carry adapters comes from the tensor keys, each rank from its shapes, each alpha from
    lora_alpha / alpha_pattern (matched as PEFT does), and use_rslora from the config. Raises PeftError naming
    the field or key for what qwax cannot represent (use_dora, bias, lora_bias, modules_to_save,
    fan_in_fan_out, ...), a key mapping to no qwax module, a shape mismatch, and ranks or alphas that differ
    within one stacked layer group (load the base with scan_layers=False then), and ValueError when the model
    already has adapters.
    """
    path = os.fspath(path)
    config = _read_config(path)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        other = " (adapter_model.bin is a pickle, which qwax does not read)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise PeftError(f"{path}: no {WEIGHTS_FILE}{other}")
    if has_lora(model):
        raise ValueError("load_peft: the model already has LoRA adapters; merge_lora() them, or start from the "
                         "base model")
    sites = adapter_sites(model)
    linear_sites = {_canonical(s.hf_name): s for s in sites if s.part == LINEAR}
    expert_sites: dict[str, dict[str, AdapterSite]] = {}
    for s in sites:
        if s.part != LINEAR:
            expert_sites.setdefault(_canonical(_expert_module(s)), {})[s.part] = s
    shapes = _site_shapes(model, sites)

    with CheckpointReader(file) as reader:
        pairs: dict[str, dict[str, str]] = {}
        for key in reader.keys():
            module, which = _parse_key(key, file)
            pairs.setdefault(module, {})[which] = key
        if not pairs:
            raise PeftError(f"{file}: no LoRA tensors")
        found: dict[AdapterSite, tuple[int, np.ndarray, np.ndarray]] = {}  # site -> (rank, A, B) qwax layout
        torch_names: dict[AdapterSite, str] = {}  # the file's name of each site, as PEFT matches its patterns
        for module, keys in pairs.items():
            if set(keys) != {"A", "B"}:
                have = next(iter(keys.values()))
                raise PeftError(f"{file}: {have!r} has no matching lora_{'B' if 'A' in keys else 'A'}.weight")
            a_key, b_key = keys["A"], keys["B"]
            a_shape, b_shape = tuple(reader.shape(a_key)), tuple(reader.shape(b_key))
            name = _canonical(module.replace(_BASE_LAYER, ""))
            if name in linear_sites:
                site = linear_sites[name]
                d_in, d_out = shapes[site.key][-2:]
                r = a_shape[0] if len(a_shape) == 2 else -1
                _check_shape(file, a_key, a_shape, (r, d_in), "[r, in]")
                _check_shape(file, b_key, b_shape, (d_out, r), "[out, r]")
                entry = (r, reader.get(a_key).T, reader.get(b_key).T)
            elif name in expert_sites:
                site, entry = _expert_entry(file, reader, a_key, b_key, expert_sites[name], shapes)
            else:
                raise PeftError(f"{file}: tensor {a_key!r} maps to no qwax module LoRA can adapt (qwax adapts the "
                                f"decoder layers' {list(KNOWN_TARGETS)})")
            if site in found:
                raise PeftError(f"{file}: two adapters for {site.hf_name!r} (tensor {a_key!r})")
            found[site] = entry
            unwrapped = module.replace(_BASE_LAYER, "")
            torch_names[site] = unwrapped if site.part == LINEAR else f"{unwrapped}.{_EXPERT_PARAM[site.part]}"

    use_rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    ranks: dict[AdapterKey, int] = {}
    scalings: dict[AdapterKey, float] = {}
    chosen: list[AdapterSite] = []
    by_key: dict[AdapterKey, list[AdapterSite]] = {}
    for s in sites:
        by_key.setdefault(s.key, []).append(s)
    for key, group in by_key.items():
        present = [s for s in group if s in found]
        if not present:
            continue
        if len(present) != len(group):
            names = [s.hf_name for s in present]
            raise PeftError(f"{file}: the adapter covers {names} but not the other layers of the same stacked "
                            f"layer group ({[s.hf_name for s in group if s not in found]}); qwax stores these "
                            "stacked: load the base model with scan_layers=False")
        group_ranks = {s.hf_name: found[s][0] for s in present}
        if len(set(group_ranks.values())) > 1:
            raise PeftError(f"{file}: ranks differ within one stacked layer group (rank_pattern): {group_ranks}; "
                            "load the base model with scan_layers=False")
        alphas = {s.hf_name: _pattern_value(alpha_pattern, torch_names[s], config["lora_alpha"]) for s in present}
        if len(set(alphas.values())) > 1:
            raise PeftError(f"{file}: alphas differ within one stacked layer group (alpha_pattern): {alphas}; "
                            "load the base model with scan_layers=False")
        rank, alpha = found[present[0]][0], next(iter(alphas.values()))
        ranks[key] = rank
        scalings[key] = float(alpha) / (math.sqrt(rank) if use_rslora else rank)
        chosen += present

    targets = tuple(t for t in KNOWN_TARGETS if any(s.target == t for s in chosen))
    try:
        lora_config = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=targets,
                                 dropout=float(config.get("lora_dropout") or 0.0), use_rslora=use_rslora)
    except ValueError as e:
        raise PeftError(f"{os.path.join(path, CONFIG_FILE)}: {e}") from None
    adapters = attach_lora(model, lora_config, chosen, ranks=ranks, scalings=scalings)
    for key, adapter in adapters.items():
        group = by_key[key]  # a scanned module's sites, in layer-group order
        a = np.stack([found[s][1] for s in group]) if group[0].group else found[group[0]][1]
        b = np.stack([found[s][2] for s in group]) if group[0].group else found[group[0]][2]
        set_lora_values(adapter, a, b)
    return model


def _site_shapes(model: Model, sites: list[AdapterSite]) -> dict[AdapterKey, tuple[int, ...]]:
    """Shape of the weight each site adapts, without its layer-group dims: [in, out] or [E, in, out]."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for s in sites:
        leaf = ("kernel",) if s.part == LINEAR else (f"experts_{s.part}",)
        out[s.key] = tuple(state[s.path + leaf].get_value().shape)[len(s.group):]
    return out


def _check_shape(file: str, key: str, got: tuple[int, ...], want: tuple[int, ...], layout: str) -> None:
    if got != want or min(got) <= 0:
        shown = [("r" if w == -1 else w) for w in want]
        raise PeftError(f"{file}: tensor {key!r} has shape {list(got)}, expected {shown} ({layout})")


def _expert_entry(file: str, reader: CheckpointReader, a_key: str, b_key: str, parts: dict[str, AdapterSite],
                  shapes: dict[AdapterKey, tuple[int, ...]]) -> tuple[AdapterSite, tuple[int, np.ndarray, np.ndarray]]:
    """The expert stack a ParamWrapper adapter belongs to (told by its in/out sizes: gate_up is H -> 2I, down
    I -> H, never both) and its factors in qwax's layout: A [E, in, r], B [E, r, out]."""
    a_shape, b_shape = tuple(reader.shape(a_key)), tuple(reader.shape(b_key))
    expected = {part: shapes[site.key] for part, site in parts.items()}  # [E, in, out]
    part = next((p for p, (e, i, o) in expected.items()
                 if len(a_shape) == 2 and len(b_shape) == 2 and a_shape[1] == i and b_shape[0] == o), None)
    if part is None:
        want = {p: f"lora_A [r*{e}, {i}], lora_B [{o}, r*{e}]" for p, (e, i, o) in expected.items()}
        raise PeftError(f"{file}: tensors {a_key!r} {list(a_shape)} / {b_key!r} {list(b_shape)} match no expert "
                        f"stack of this model; expected one of {want}")
    e, i, o = expected[part]
    if a_shape[0] % e or a_shape[0] == 0 or b_shape[1] != a_shape[0]:
        raise PeftError(f"{file}: tensor {a_key!r} has shape {list(a_shape)} and {b_key!r} {list(b_shape)}; "
                        f"expected [r*{e}, {i}] and [{o}, r*{e}] with the same r")
    r = a_shape[0] // e
    a = reader.get(a_key).reshape(e, r, i).transpose(0, 2, 1)  # [E, in, r]
    b = reader.get(b_key).reshape(o, r, e).transpose(2, 1, 0)  # [E, r, out]
    return parts[part], (r, a, b)
