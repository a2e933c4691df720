"""Which parameters train: each part (trunk, heads, value head) is trained, LoRA-adapted or frozen.

Parts of an `MTPTransformer`:
    trunk  the token embeddings and the shared blocks (layers[:-1])
    heads  the per-head blocks (layers[-1] and extra_heads) with the shared final norm and unembedding
A tied unembedding is the embedding matrix itself: it trains when either part trains.

LoRA adapters are injected with peft's `inject_adapter_in_model`, which works on any nn.Module:
the model keeps its class and methods, and each targeted nn.Linear becomes a peft LoRA layer
(`<name>.base_layer`, `<name>.lora_A.default`, `<name>.lora_B.default`). The adapters' initial values
are drawn here, per parameter name (`lora_init_sources`), not by peft from the global generator, so a
model adapted whole and one adapted on the meta device and filled shard by shard start the same.
"""

from __future__ import annotations

import logging
import math
import re
import zlib

import torch
from torch import nn

from weighted_mtp.errors import ConfigError
from weighted_mtp.models.checkpoints import TensorSource

log = logging.getLogger(__name__)

_MODES = ("train", "lora", "frozen")
_ADAPTER = "default"


def model_parts(model: nn.Module, *, unembedding_apart: bool = False) -> dict[str, list[tuple[str, nn.Module]]]:
    """(name, module) pairs of each part, names relative to the model; with `unembedding_apart` the
    final norm and unembedding are a part of their own instead of the heads'."""
    n_trunk = len(model.layers) - 1
    trunk = [("tok_embeddings", model.tok_embeddings)]
    trunk += [(f"layers.{i}", model.layers[i]) for i in range(n_trunk)]
    heads = [(f"layers.{n_trunk}", model.layers[n_trunk])]
    heads += [(f"extra_heads.{i}", block) for i, block in enumerate(model.extra_heads)]
    unembedding = [("norm", model.norm), ("output", model.output)]
    if unembedding_apart:
        return {"trunk": trunk, "heads": heads, "unembedding": unembedding}
    return {"trunk": trunk, "heads": heads + unembedding}


def lora_target_names(root: str, module: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the nn.Linear submodules whose own name is one of `targets` (e.g. wq, w1)."""
    names = []
    for name, sub in module.named_modules():
        full = f"{root}.{name}" if root and name else (root or name)
        leaf = full.rsplit(".", 1)[-1]
        if isinstance(sub, nn.Linear) and leaf in targets:
            names.append(full)
    return names


def inject_lora(module: nn.Module, target_names: list[str], *, r: int, alpha: float, dropout: float) -> None:
    """Replace each named nn.Linear by a LoRA layer (B = 0, so the function is unchanged at first)."""
    from peft import LoraConfig, inject_adapter_in_model

    # Exact full names: a regex anchored on the whole name, so `layers.1.attention.wq` does not
    # also match `layers.11.attention.wq`.
    pattern = "^(" + "|".join(re.escape(name) for name in target_names) + ")$"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, module, adapter_name=_ADAPTER)


def lora_init_sources(module: nn.Module, seed: int, prefix: str = "") -> dict[str, TensorSource]:
    """Each adapter's initial value by parameter name: A uniform in +-1/sqrt(in_features) (peft's
    default, Kaiming-uniform with a = sqrt 5) from a generator seeded by `seed` and the name (with
    `prefix`), B zero, so the function is unchanged at first. Independent of device and build order."""
    sources = {}
    for name, param in module.named_parameters():
        shape = tuple(param.shape)
        if ".lora_A." in f".{name}":
            key = zlib.crc32(f"{seed}:{prefix}{name}".encode())  # the CPU generator keeps 32 bits of a seed
            bound = 1 / math.sqrt(shape[1])

            def read(dtype: torch.dtype, shape=shape, key=key, bound=bound) -> torch.Tensor:
                draw = torch.rand(shape, generator=torch.Generator().manual_seed(key), dtype=torch.float64)
                return ((2 * draw - 1) * bound).to(dtype)

            sources[name] = TensorSource(shape, read)
        elif ".lora_B." in f".{name}":
            sources[name] = TensorSource(shape, lambda dtype, shape=shape: torch.zeros(shape, dtype=dtype))
    return sources


@torch.no_grad()
def init_lora_(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Set every adapter of a model in memory to its initial value (`lora_init_sources`)."""
    sources = lora_init_sources(module, seed, prefix)
    for name, param in module.named_parameters():
        if name in sources:
            param.copy_(sources[name].read(param.dtype))


def adapted_sources(model: nn.Module, sources: dict[str, TensorSource], seed: int) -> dict[str, TensorSource]:
    """What fills each parameter of a model adapted on the meta device: a base layer's weight is the
    checkpoint tensor of the layer it wraps, an adapter its initial value."""
    adapters = lora_init_sources(model, seed)
    return {name: adapters[name] if name in adapters else sources[name.replace(".base_layer.", ".")]
            for name, _ in model.named_parameters()}


def configure_training_modes(
    model: nn.Module,
    *,
    trunk: str,
    heads: str,
    lora_targets: list[str],
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    value_head: nn.Module | None = None,
    value_head_mode: str = "train",
    unembedding: str = "as_heads",
    seed: int = 0,
) -> dict[str, int]:
    """Freeze, adapt or train each part in place; return trainable parameter counts per part. New
    adapters start from `lora_init_sources(..., seed)` (on the meta device: when filled).
    `unembedding: frozen` takes the final norm and unembedding out of the heads' part, frozen."""
    modes = {"trunk": trunk, "heads": heads}
    if value_head is not None:
        modes["value_head"] = value_head_mode
    for part, mode in modes.items():
        if mode not in _MODES:
            raise ConfigError(f"training.freeze.{part}: unknown mode {mode!r} (one of {', '.join(_MODES)})")
    if unembedding not in ("as_heads", "frozen"):
        raise ConfigError(f"training.freeze.unembedding: unknown mode {unembedding!r} (as_heads or frozen)")

    unembedding_apart = unembedding == "frozen"
    if unembedding_apart:
        modes["unembedding"] = "frozen"
    parts = model_parts(model, unembedding_apart=unembedding_apart)

    lora_names = []
    for part, members in parts.items():
        if modes[part] == "lora":
            for root, module in members:
                lora_names += lora_target_names(root, module, lora_targets)
    if any(mode == "lora" for part, mode in modes.items() if part in parts) and not lora_names:
        raise ConfigError(
            f"training.lora.target_modules: none of {lora_targets} names an nn.Linear in the LoRA-adapted parts"
        )
    lora = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout}
    if lora_names:
        inject_lora(model, lora_names, **lora)
        parts = model_parts(model, unembedding_apart=unembedding_apart)  # LoRA layers replaced some modules
        if not next(model.parameters()).is_meta:
            init_lora_(model, seed)
    if value_head is not None and value_head_mode == "lora":
        names = [name for name, sub in value_head.named_modules() if isinstance(sub, nn.Linear)]
        if not names:
            raise ConfigError("training.freeze.value_head: lora, but the value head has no nn.Linear layer")
        inject_lora(value_head, names, **lora)
        init_lora_(value_head, seed, prefix="value_head.")

    # Decide every parameter explicitly: frozen first, then LoRA adapters, then fully trained parts,
    # so that a tied embedding shared by a frozen and a trained part ends up trained.
    groups = [(part, [m for _, m in members]) for part, members in parts.items()]
    if value_head is not None:
        groups.append(("value_head", [value_head]))
    for _, modules in groups:
        for module in modules:
            module.requires_grad_(False)
    for part, modules in groups:
        for module in modules:
            for name, param in module.named_parameters():
                if modes[part] == "lora" and ".lora_" in f".{name}":
                    param.requires_grad_(True)
    for part, modules in groups:
        if modes[part] == "train":
            for module in modules:
                for name, param in module.named_parameters():
                    if ".lora_" not in f".{name}":
                        param.requires_grad_(True)

    counts = {
        part: sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
        for part, modules in groups
    }
    log.info(
        "trainable parameters: %s", ", ".join(f"{part} {n:,} ({modes[part]})" for part, n in counts.items())
    )
    return counts


def has_lora(module: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in module.named_parameters())


def lora_scaling(r: int, alpha: float) -> float:
    """peft's LoRA scale (without rsLoRA): the update is (alpha / r) * B @ A."""
    return alpha / r


def merge_lora_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights: a plain state dict the base model class loads.

    Works on a full (gathered) state dict, so it needs no peft module and no unsharded model.
    """
    merged: dict[str, torch.Tensor] = {}
    suffix_a = f".lora_A.{_ADAPTER}.weight"
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        prefix, _, param = key.partition(".base_layer.")
        if param == "weight" and f"{prefix}{suffix_a}" in state:
            lora_a = state[f"{prefix}{suffix_a}"].to(torch.float32)
            lora_b = state[f"{prefix}.lora_B.{_ADAPTER}.weight"].to(torch.float32)
            delta = scaling * (lora_b @ lora_a)
            value = (value.to(torch.float32) + delta).to(value.dtype)
        merged[f"{prefix}.{param}"] = value
    return merged


def merge_lora_(module: nn.Module) -> nn.Module:
    """Merge LoRA adapters into the base layers in place, with peft's own merge, and drop them."""
    from peft.tuners.lora import LoraLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):
            sub.merge(adapter_names=[_ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    return module
