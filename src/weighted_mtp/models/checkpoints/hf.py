"""Hugging Face LLaMA directories: `config.json` + `model.safetensors` (or shards with an index).

HF stores wq/wk with the two halves of each head's rotary dims split apart (its `rotate_half` RoPE);
we use Meta's interleaved pairs, so loading undoes that permutation and export applies it.
Export writes head 1 as a plain `LlamaForCausalLM` and the extra heads, in our key names and layout,
to `mtp_heads.safetensors` beside it; loading such a directory brings the heads back.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from weighted_mtp.errors import CheckpointError
from weighted_mtp.io import atomic_directory, atomic_write_json
from weighted_mtp.models.checkpoints import (
    RawCheckpoint,
    TensorSource,
    read_json,
    require,
    safetensors_sources,
)
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

HEADS_FILE = "mtp_heads.safetensors"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# our name suffix inside a block -> HF's
BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def to_hf_rotary(weight: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved (x0, x1), (x2, x3) ... rows -> HF's [x0, x2, ... | x1, x3, ...] per head."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rotary(weight: Tensor, n_heads: int) -> Tensor:
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # layers.N.<suffix>
    return f"model.layers.{index}.{BLOCK_NAMES[rest]}"


def args_from_config(config: dict, path: Path) -> ModelArgs:
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not a LLaMA-family model this loader reads"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention/MLP biases are not supported")
    dim, n_heads = require(config, "hidden_size", path), require(config, "num_attention_heads", path)
    if config.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{path}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default", None):
        raise CheckpointError(
            f"{path}: rope scaling {scaling.get('rope_type')!r} is not supported (llama3 is)"
        )
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    try:
        return ModelArgs(
            dim=dim,
            n_layers=require(config, "num_hidden_layers", path),
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=require(config, "vocab_size", path),
            ffn_hidden_dim=require(config, "intermediate_size", path),
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling={
                k: scaling[k]
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                if k in scaling
            }
            if scaling
            else None,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def read_hf_weights(path: Path) -> dict[str, TensorSource]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = require(read_json(index), "weight_map", index)
        tensors: dict[str, TensorSource] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / shard}: shard listed in {index.name} not found")
            tensors.update(safetensors_sources(path / shard))
        return tensors
    if (path / "model.safetensors").is_file():
        return safetensors_sources(path / "model.safetensors")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json beside config.json")


def load(path: Path) -> RawCheckpoint:
    config_path = path / "config.json"
    args = args_from_config(read_json(config_path), config_path)
    hf_tensors = read_hf_weights(path)
    state: dict[str, TensorSource] = {}
    names = {
        hf_name(f"layers.{i}.{suffix}"): f"layers.{i}.{suffix}"
        for i in range(args.n_layers)
        for suffix in BLOCK_NAMES
    }
    names.update({hf: ours for ours, hf in TOP_NAMES.items()})
    for hf_key, source in hf_tensors.items():
        if hf_key.endswith("rotary_emb.inv_freq"):
            continue
        if hf_key not in names:
            raise CheckpointError(f"{path}: unexpected tensor {hf_key} for a {args.n_layers}-layer LLaMA")
        ours = names[hf_key]
        if ours.endswith(("attention.wq.weight", "attention.wk.weight")):
            n_heads = args.n_heads if ours.endswith("wq.weight") else args.n_kv_heads
            source = source.then(partial(from_hf_rotary, n_heads=n_heads))
        state[ours] = source
    if "output.weight" not in state:
        args.tie_embeddings = True

    heads_path = path / HEADS_FILE
    if heads_path.is_file():
        heads = safetensors_sources(heads_path)
        n_extra = len({key.split(".")[1] for key in heads if key.startswith("extra_heads.")})
        if any(not key.startswith("extra_heads.") for key in heads):
            raise CheckpointError(f"{heads_path}: holds tensors other than extra_heads.*")
        state.update(heads)
        args.n_layers += n_extra
        args.n_future_tokens += n_extra
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = path / "tokenizer.model"
    return RawCheckpoint(args, state, tokenizer if tokenizer.is_file() else None, path, "hf")


def hf_config(
    args: ModelArgs,
    *,
    n_layers: int,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    dtype: torch.dtype,
) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    return config


def hf_state_dict(model: MTPTransformer) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(head 1 as LlamaForCausalLM tensors, extra head tensors under our names), on CPU."""
    args = model.args
    hf_tensors: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if name.startswith("extra_heads."):
            extra[name] = tensor.contiguous()
            continue
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name.endswith("attention.wq.weight"):
            tensor = to_hf_rotary(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = to_hf_rotary(tensor, args.n_kv_heads)
        hf_tensors[hf_name(name)] = tensor.contiguous()
    return hf_tensors, extra


def export_hf(model: MTPTransformer, directory: Path, tokenizer=None) -> Path:
    """Write head 1 as a `LlamaForCausalLM` directory; extra heads go to `mtp_heads.safetensors`."""
    args = model.args
    hf_tensors, extra = hf_state_dict(model)
    dtype = model.tok_embeddings.weight.dtype
    with atomic_directory(directory) as tmp:
        save_file(hf_tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(
            args,
            n_layers=len(model.layers),
            dtype=dtype,
            bos_id=getattr(tokenizer, "bos_id", None),
            eos_id=getattr(tokenizer, "eos_id", None),
            pad_id=getattr(tokenizer, "pad_id", None),
        )
        atomic_write_json(tmp / "config.json", config)
        if extra:
            save_file(
                extra,
                str(tmp / HEADS_FILE),
                metadata={
                    "format": "pt",
                    "n_future_tokens": str(args.n_future_tokens),
                    "layout": "weighted_mtp (Meta key names, interleaved rotary)",
                },
            )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": config["bos_token_id"],
                    "eos_token_id": config["eos_token_id"],
                    "pad_token_id": config["pad_token_id"],
                },
                indent=2,
            )
            + "\n"
        )
    return directory


ADAPTER_DIR = "peft_adapter"
# our LoRA-targeted linear layers -> HF's module names
LINEAR_NAMES = {key.removesuffix(".weight"): value.removesuffix(".weight") for key, value in BLOCK_NAMES.items()}


def peft_adapter_tensors(state: dict[str, Tensor], args: ModelArgs, adapter: str = "default") -> dict[str, Tensor]:
    """The LoRA adapters of a (gathered, unmerged) state dict under PEFT's names for the Hugging Face
    export (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...). The rows of q and k
    are permuted into HF's rotary layout, so B of wq becomes P B (A is unchanged: the update P B A is
    the permuted update). Extra heads are not in the HF model, so their adapters are left out."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{adapter}.weight"
            if not key.endswith(marker) or not key.startswith("layers."):
                continue
            module = key.removesuffix(marker)  # layers.N.attention.wq
            _, index, rest = module.split(".", 2)
            tensor = tensor.detach().to("cpu")
            if part == "lora_B" and rest == "attention.wq":
                tensor = to_hf_rotary(tensor, args.n_heads)
            elif part == "lora_B" and rest == "attention.wk":
                tensor = to_hf_rotary(tensor, args.n_kv_heads)
            out[f"base_model.model.model.layers.{index}.{LINEAR_NAMES[rest]}.{part}.weight"] = tensor.contiguous()
    return out


def export_peft_adapter(
    state: dict[str, Tensor], args: ModelArgs, directory: Path, *, r: int, alpha: float, dropout: float, base_model: str
) -> Path | None:
    """A standard PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained` loads onto the Hugging Face export of the base model; None when
    the state has no adapters."""
    tensors = peft_adapter_tensors(state, args)
    if not tensors:
        return None
    targets = sorted({name.split(".")[-3] for name in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)
    return Path(directory)
