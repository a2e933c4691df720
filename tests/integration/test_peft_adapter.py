"""A LoRA run's export holds a standard PEFT adapter: peft loads it onto the Hugging Face export of the
base model and gives the run's own logits; peft's merge equals ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from weighted_mtp.models.checkpoints.hf import ADAPTER_DIR, export_hf
from weighted_mtp.models.loading import load_model


def test_the_peft_adapter_of_a_lora_run_loads_in_peft_with_the_runs_logits(in_tmp_repo: Path, shared_data: Path):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from weighted_mtp.cli import main

    assert main(["train", "--recipe", "baseline", "--preset", "local-light", "--use-micro-model",
                 f"paths.raw_data={shared_data}", "device=cpu", "training.max_steps=2",
                 "training.lora.enabled=true", "training.lora.r=4", "training.lr=5e-3", "data.val_split=null",
                 "training.eval_every=null"]) == 0  # fmt: skip
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp_repo / 'storage' / 'mlruns' / 'mlflow.db'}")
    version = client.get_model_version("baseline-micro", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["model.kind"] == "peft_adapter" and run.data.tags["model.base"] == "micro"
    logged = Path(run.info.artifact_uri.removeprefix("file://")) / "model"
    assert sorted(p.name for p in logged.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    final = in_tmp_repo / "storage" / "runs" / "baseline" / "final"
    adapter = final / ADAPTER_DIR
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    trained, _ = load_model(final, models_dir=in_tmp_repo / "storage" / "models")
    base, _ = load_model("micro", models_dir=in_tmp_repo / "storage" / "models", seed=42,
                         n_future_tokens=trained.n_future_tokens)  # fmt: skip
    hf_base = transformers.LlamaForCausalLM.from_pretrained(export_hf(base, in_tmp_repo / "hf-base")).eval()
    assert main(["model", "export", "--adapter", str(final), str(in_tmp_repo / "adapter")]) == 0
    assert main(["model", "export", "--adapter", str(final), str(in_tmp_repo / "adapter")]) == 2  # never over a file
    with_adapter = PeftModel.from_pretrained(hf_base, in_tmp_repo / "adapter").eval()
    tokens = torch.randint(0, trained.args.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained.eval()(tokens).logits[:, :, 0]
        before = base.eval()(tokens).logits[:, :, 0]
        theirs = with_adapter(input_ids=tokens).logits
        assert (ours - before).abs().max() > 1e-3  # the adapter changed the model
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        merged = with_adapter.merge_and_unload()(input_ids=tokens).logits  # peft's merge against ours
        torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)


def test_a_run_without_lora_has_no_adapter(in_tmp_repo: Path, shared_data: Path):
    from weighted_mtp.cli import main

    assert main(["train", "--recipe", "baseline", "--preset", "local-light", "--use-micro-model",
                 f"paths.raw_data={shared_data}", "device=cpu", "tracking.enabled=false", "training.max_steps=1",
                 "training.lora.enabled=false", "data.val_split=null", "training.eval_every=null"]) == 0  # fmt: skip
    final = in_tmp_repo / "storage" / "runs" / "baseline" / "final"
    assert not (final / ADAPTER_DIR).exists()
    assert main(["model", "export", "--adapter", str(final), str(in_tmp_repo / "adapter")]) == 2
