"""The trained model as a standalone directory that `load_model` reads back.

Layout: the native checkpoint format of `weighted_mtp.models.checkpoints.native` (`model.safetensors`
with LoRA adapters merged into the base weights, `config.json`, the tokenizer), plus one
`<name>.safetensors` per extra trained module (a value head). Every rank takes part in gathering
the weights; rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from weighted_mtp.config import save_resolved_config
from weighted_mtp.config.schema import Config
from weighted_mtp.io import atomic_directory
from weighted_mtp.models.lora import lora_scaling, merge_lora_state_dict
from weighted_mtp.train.distributed import DistEnv, barrier

log = logging.getLogger(__name__)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered to full CPU tensors (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_trained_model(
    directory: Path, modules: nn.ModuleDict, config: Config, env: DistEnv, tokenizer=None,
    tracking_run_id: str | None = None,
) -> Path:
    """`tracking_run_id`: the tracker's run that trained it, recorded so that an evaluation of this
    directory can link its own run to it."""
    from safetensors.torch import save_file

    from weighted_mtp.models.checkpoints.hf import ADAPTER_DIR, export_peft_adapter
    from weighted_mtp.models.checkpoints.native import FORMAT, WEIGHTS
    from weighted_mtp.train.checkpoint import distinct_tensors

    lora = config.training.lora
    scaling = lora_scaling(lora.r, lora.alpha)
    unmerged = {name: full_state_dict(module) for name, module in modules.items()}
    states = {name: merge_lora_state_dict(state, scaling) for name, state in unmerged.items()}
    if env.is_main:
        args = modules["model"].args
        model_state = states.pop("model")
        if args.tie_embeddings:
            model_state.pop("output.weight", None)  # the embedding matrix itself
        with atomic_directory(directory) as tmp:
            save_file(distinct_tensors(model_state), tmp / WEIGHTS, metadata={"format": "pt"})
            dtype = str(next(iter(model_state.values())).dtype).removeprefix("torch.")
            manifest = {
                "format": FORMAT,
                "model_args": args.to_dict(),
                "dtype": dtype,
                "extra": {
                    "modules": sorted(states), "experiment": config.experiment.name, "tracking_run_id": tracking_run_id,
                },
            }
            (tmp / "config.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for name, state in states.items():
                save_file(distinct_tensors(state), tmp / f"{name}.safetensors")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            save_resolved_config(config, tmp)  # what produced it (e.g. a value head's type and loss)
            export_peft_adapter(  # LoRA runs: the adapters alone, for peft on the HF export of the base
                unmerged["model"], args, tmp / ADAPTER_DIR, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                base_model=config.model.name,
            )
        log.info("exported the trained model to %s", directory)
    barrier(env)
    return Path(directory)
