"""LoRA fine-tuning of qwax models: attach adapters, merge them, and the filters that train them.

    model = qwax.load_hf(path)
    model = qwax.apply_lora(model, qwax.LoRAConfig(rank=16, alpha=32))   # in place; returns the model
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)        # train `trainable` only
    qwax.save_peft(model, "adapter/")                                      # a PEFT adapter directory
    merged = qwax.merge_lora(model)                                        # W + s * A B, no adapters: save_hf

Adapters go on the Linear layers of the decoder whose Hugging Face module name ends with one of the config's
targets (names from qwax.convert.keymap, so they are the names transformers and PEFT use), and with the target
"experts" on the routed expert stacks. The MTP head, the vision tower, the MoE router (mlp.gate),
shared_expert_gate and the LM head are never adapted: transformers' models have no MTP module, and an adapter
there could not be exported to PEFT. The maths lives in qwax.layers.lora.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwax.convert.keymap import CheckpointLayout, ParamPath, model_tensor_maps
from qwax.layers.common import Linear
from qwax.layers.lora import EXPERTS_TARGET, KNOWN_TARGETS, ExpertsLoRA, LoRA, LoRAConfig, LoRAParam, lora_dropout
from qwax.layers.moe import SparseMoE
from qwax.model import QwaxForCausalLM
from qwax.multimodal.model import QwaxForConditionalGeneration

__all__ = ["apply_lora", "merge_lora", "has_lora", "lora_config_of", "adapter_sites", "attach_lora", "lora_modules",
           "set_lora_values",
           "AdapterSite", "LoRAConfig", "LoRAParam", "lora_dropout", "TRAINABLE", "FROZEN"]

Model = QwaxForCausalLM | QwaxForConditionalGeneration

# nnx filters: the adapter weights, and every other parameter (the frozen base weights).
TRAINABLE = LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(LoRAParam))

_CONFIG_ATTR = "lora_config"  # static attribute of the model holding the LoRAConfig its adapters were built with
LINEAR, GATE_UP, DOWN = "linear", "gate_up", "down"
_EXPERT_PARAMS = {"experts_gate_up": GATE_UP, "experts_down": DOWN}
AdapterKey = tuple[ParamPath, str]  # (qwax path of the adapted module, part: LINEAR, GATE_UP or DOWN)


@dataclass(frozen=True)
class AdapterSite:
    """One adaptable weight of one decoder layer, as transformers names it.

    hf_name: the torch module name ("model.layers.3.self_attn.q_proj"), or for routed experts the parameter name
    ("model.layers.0.mlp.experts.gate_up_proj", what PEFT's target_parameters name). target: the config target
    it answers to ("q_proj", ..., "experts"). path: qwax path of the adapted module (the Linear, or the SparseMoE
    for experts); part: LINEAR, GATE_UP or DOWN. group: () when unrolled, (g,) for layer group g of a scanned
    stack, whose module (and adapter) hold every group stacked on a leading dim.
    """

    hf_name: str
    target: str
    path: ParamPath
    part: str
    group: tuple[int, ...]

    @property
    def key(self) -> AdapterKey:
        return self.path, self.part


def _text_model(model: Model) -> tuple[QwaxForCausalLM, ParamPath]:
    """(the text model, its path in `model`)."""
    if isinstance(model, QwaxForConditionalGeneration):
        return model.language_model, ("language_model",)
    if isinstance(model, QwaxForCausalLM):
        return model, ()
    raise TypeError(f"expected a QwaxForCausalLM or QwaxForConditionalGeneration, got {type(model).__name__}")


def adapter_sites(model: Model) -> list[AdapterSite]:
    """Every weight of the decoder layers LoRA can adapt, in checkpoint order, named as in transformers' model
    (fused experts: transformers holds them as [E, 2I, H] / [E, H, I] stacks whatever the checkpoint layout)."""
    text, base = _text_model(model)
    layout = CheckpointLayout(prefix=CheckpointLayout.default_for(model.config).prefix, fused_experts=True)
    decoder = base + ("decoder",)
    sites = []
    for m in model_tensor_maps(model.config, layout, text.decoder.scanned):
        if m.path[:len(decoder)] != decoder:
            continue  # embeddings, final norm, LM head, MTP head, vision tower
        leaf = m.path[-1]
        if leaf == "kernel" and m.hf_key.endswith(".weight"):
            name = m.hf_key.removesuffix(".weight")
            target = name.rpartition(".")[2]
            if target in KNOWN_TARGETS:  # not the router (mlp.gate) nor shared_expert_gate
                sites.append(AdapterSite(name, target, m.path[:-1], LINEAR, tuple(m.index)))
        elif leaf in _EXPERT_PARAMS:
            sites.append(AdapterSite(m.hf_key, EXPERTS_TARGET, m.path[:-1], _EXPERT_PARAMS[leaf], tuple(m.index)))
    return sites


def _module_at(root: nnx.Module, path: ParamPath) -> Any:
    node = root
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def lora_modules(model: Model) -> dict[AdapterKey, LoRA]:
    """{(module path, part): adapter} of every adapter attached to `model`."""
    found: dict[AdapterKey, LoRA] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.lora is not None:
            found[(tuple(path), LINEAR)] = module.lora
        elif isinstance(module, SparseMoE) and module.experts_lora is not None:
            for part in (GATE_UP, DOWN):
                adapter = getattr(module.experts_lora, part)
                if adapter is not None:
                    found[(tuple(path), part)] = adapter
    return found


def has_lora(model: nnx.Module) -> bool:
    """True when `model` holds any adapter weight."""
    return any(True for _ in nnx.to_flat_state(nnx.state(model, LoRAParam)))


def lora_config_of(model: Model) -> LoRAConfig | None:
    """The LoRAConfig the model's adapters were built with (apply_lora / load_peft), None without adapters."""
    return getattr(model, _CONFIG_ATTR, None) if has_lora(model) else None


def attach_lora(model: Model, config: LoRAConfig, sites: list[AdapterSite], *, seed: int = 0,
                ranks: Mapping[AdapterKey, int] | None = None,
                scalings: Mapping[AdapterKey, float] | None = None) -> dict[AdapterKey, LoRA]:
    """Attach freshly initialised adapters (A uniform, B zero) at `sites`, in place; the building block of
    apply_lora and load_peft. ranks / scalings: per (module path, part), default config.rank / config.scaling.
    Records `config` on the model. Returns {(module path, part): adapter}.

    The sites of one module must cover all its layer groups (a scanned module has one adapter for the stack).
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them, or start from the base model")
    ranks, scalings = ranks or {}, scalings or {}
    by_key: dict[AdapterKey, list[AdapterSite]] = {}
    for s in sites:
        by_key.setdefault(s.key, []).append(s)
    root = jax.random.key(seed)
    opts = model.options
    adapters: dict[AdapterKey, LoRA] = {}
    salt = 0
    for n, (key, group_sites) in enumerate(by_key.items()):
        path, part = key
        module = _module_at(model, path)
        weight = module.kernel if part == LINEAR else getattr(module, f"experts_{part}")
        axes = tuple(weight.get_metadata()["logical_axes"])
        shape = tuple(weight.get_value().shape)
        groups = shape[:len(shape) - len(axes)]  # the scanned stack's layer-group dims, not in the logical axes
        if len(group_sites) != (groups[0] if groups else 1):
            raise ValueError(f"adapter sites of {'.'.join(map(str, path))} ({part}) cover {len(group_sites)} of "
                             f"the module's {groups[0] if groups else 1} layer group(s)")
        stack = shape[len(groups):-2]
        count = groups[0] if groups else 1
        salts = jnp.arange(salt, salt + count, dtype=jnp.int32).reshape(groups)
        salt += count
        adapters[key] = LoRA(shape[-2], shape[-1], ranks.get(key, config.rank),
                             scaling=scalings.get(key, config.scaling), axes=axes,
                             key=jax.random.fold_in(root, n), salt=salts, groups=groups, stack=stack,
                             dropout=0.0 if stack else config.dropout, param_dtype=opts.param_dtype,
                             dtype=opts.dtype)
    for (path, part), adapter in adapters.items():
        module = _module_at(model, path)
        _place_like(adapter, module.kernel if part == LINEAR else getattr(module, f"experts_{part}"))
        if part == LINEAR:
            module.lora = adapter
        elif module.experts_lora is None:
            module.experts_lora = ExpertsLoRA(adapter if part == GATE_UP else None, adapter if part == DOWN else None)
        else:
            setattr(module.experts_lora, part, adapter)
    setattr(model, _CONFIG_ATTR, config)
    return adapters


def _place_like(adapter: LoRA, weight: nnx.Variable) -> None:
    """Shard a new adapter as its base weight is sharded on a multi-device mesh (A takes W's spec with its out
    dim whole, B with its in dim whole, the salt W's layer-group dims), so an already placed model runs as it is.
    A weight on one device leaves the adapter on the default device."""
    sharding = getattr(weight.get_value(), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return
    ndim = weight.get_value().ndim
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    specs = {"lora_a": spec[:-1] + (None,), "lora_b": spec[:-2] + (None, spec[-1]),
             "salt": spec[:adapter.salt.get_value().ndim]}
    for name, dims in specs.items():
        variable = getattr(adapter, name)
        variable.set_value(jax.device_put(variable.get_value(), NamedSharding(sharding.mesh, PartitionSpec(*dims))))


def set_lora_values(adapter: LoRA, lora_a: Any, lora_b: Any) -> None:
    """Replace an adapter's A [*lead, in, r] and B [*lead, r, out] (numpy or jax arrays), keeping its dtypes,
    shapes and placement. Raises ValueError naming a shape mismatch."""
    for variable, value, name in ((adapter.lora_a, lora_a, "lora_a"), (adapter.lora_b, lora_b, "lora_b")):
        old = variable.get_value()
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"set_lora_values: {name} has shape {list(value.shape)}, expected {list(old.shape)}")
        value = jnp.asarray(value, old.dtype)
        variable.set_value(jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else value)


def apply_lora(model: Model, config: LoRAConfig, *, seed: int = 0) -> Model:
    """Attach LoRA adapters to `model` in place and return it.

    Every decoder-layer Linear whose HF module name ends with one of config.targets gets an adapter (A uniform as
    PEFT initialises it, from `seed`; B zero, so the model's function is unchanged), and with the target
    "experts" both routed expert stacks do. Scanned (stacked) and unrolled layouts, and a
    QwaxForConditionalGeneration's language model, are handled alike.
    Raises ValueError when the model already has adapters, when "experts" is asked of a model without routed
    experts, or when no module matches (naming the targets this model has).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"apply_lora: config must be a qwax.LoRAConfig, got {type(config).__name__}")
    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters; merge_lora() them first, or start from "
                         "the base model")
    sites = adapter_sites(model)
    available = list(dict.fromkeys(s.target for s in sites))
    if EXPERTS_TARGET in config.targets and EXPERTS_TARGET not in available:
        raise ValueError(f"apply_lora: target {EXPERTS_TARGET!r}, but this model has no routed experts")
    chosen = [s for s in sites if s.target in config.targets]
    if not chosen:
        raise ValueError(f"apply_lora: no module of this model matches targets {list(config.targets)}; its "
                         f"adaptable modules are {available}")
    attach_lora(model, config, chosen, seed=seed)
    return model


def merge_lora(model: Model) -> Model:
    """A new model whose weights are W + s * A B (computed in float32, stored in W's dtype), without adapters:
    it computes what the adapted model computes, and save_hf writes it as an ordinary checkpoint. `model` is
    left unchanged."""
    if not has_lora(model):
        raise ValueError("merge_lora: the model has no LoRA adapters")
    merged = nnx.clone(model)
    for path, module in list(nnx.iter_modules(merged)):
        if isinstance(module, Linear) and module.lora is not None:
            pairs = [(module.kernel, module.lora)]
            module.lora = None
        elif isinstance(module, SparseMoE) and module.experts_lora is not None:
            pairs = [(module.experts_gate_up, module.experts_lora.gate_up), (module.experts_down,
                                                                             module.experts_lora.down)]
            module.experts_lora = None
        else:
            continue
        for weight, adapter in pairs:
            if adapter is not None:
                w = weight.get_value()
                delta = adapter.delta(jnp.float32, jax.lax.Precision.HIGHEST)
                weight.set_value((w.astype(jnp.float32) + delta).astype(w.dtype))
    if hasattr(merged, _CONFIG_ATTR):
        delattr(merged, _CONFIG_ATTR)
    return merged
