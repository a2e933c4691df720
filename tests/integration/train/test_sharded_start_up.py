"""A sharded start-up under `torchrun --nproc_per_node=2` (gloo): a 101M-parameter checkpoint in Meta's
format (two model-parallel shards, untied unembedding) is built on the meta device on each rank,
sharded, and each rank reads only its rows of every tensor. Start-up memory is the rise of each
process's resident high-water mark from before loading to the end of sharding; one process loading the
whole model rises by the fp32 model plus a fixed overhead (tokenizer, data index, code: about 180 MB
here, which would hide the weights of a model this small), and each rank's rise minus that overhead is
at most 0.6x the fp32 model (its shards are 0.5x). The run trains exactly like one process holding the
whole model.

A Rho-1 reference starts the same way: a run training a small model (28M) against the 101M reference
holds at most 0.6x the two fp32 models per rank (a reference loaded whole would put it above 0.75x).
So does a LoRA run: adapters are added to the model on the meta device and filled like the rest."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch
from conftest import assert_same_losses
from fixtures.checkpoints import write_meta_checkpoint
from test_distributed import torchrun

from weighted_mtp.models.loading import resolve_smollm2
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM from /proc")

PEAK = re.compile(r"rank (\d): start-up peak resident memory [\d.]+ GiB, ([\d.]+) GiB above the process before loading")


def write_checkpoint(directory, *, dim: int, n_layers: int, seed: int) -> ModelArgs:
    """A one-head Meta checkpoint in two model-parallel shards, over the micro tokenizer's 49152 tokens."""
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=8, n_kv_heads=4, vocab_size=49152, ffn_hidden_dim=3 * dim,
                     n_future_tokens=1, tie_embeddings=False)
    with torch.device("meta"):
        model = MTPTransformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed, std=0.02)
    write_meta_checkpoint(model, directory, n_shards=2)
    return args


def parameters_with_heads(args: ModelArgs, n_heads: int) -> int:
    """The parameters of the model built from `args` with `n_heads` heads (the extra ones copied)."""
    with torch.device("meta"):
        return MTPTransformer(dataclasses.replace(args, n_future_tokens=n_heads)).num_parameters()


@pytest.fixture(scope="module")
def meta_checkpoint(micro_workspace):
    """16 layers of width 512: 101M parameters."""
    directory = micro_workspace.root / "meta-110m"
    args = write_checkpoint(directory, dim=512, n_layers=16, seed=5)
    assert parameters_with_heads(args, 1) > 100e6
    return directory, args


@pytest.fixture(scope="module")
def small_checkpoint(micro_workspace):
    """4 layers of width 256: 28M parameters."""
    directory = micro_workspace.root / "meta-28m"
    return directory, write_checkpoint(directory, dim=256, n_layers=4, seed=6)


def assert_sharded_start_up(ws, whole_run: str, sharded_run: str, fp32_bytes: int) -> None:
    """Each rank's start-up rise, less the overhead one whole process has besides the weights, is at
    most 0.6x the fp32 weights; the two runs' losses agree."""
    log = (ws.runs.parent / f"{sharded_run}.run.log").read_text()
    rises = {int(rank): float(gib) * 2**30 for rank, gib in PEAK.findall(log)}
    assert sorted(rises) == [0, 1], log[-3000:]
    whole = float(PEAK.search(ws.log_tail(whole_run)).group(2)) * 2**30
    assert whole >= fp32_bytes  # one process holds it all
    overhead = whole - fp32_bytes  # what start-up holds besides the weights: the tokenizer, data, code
    for rank, rise in rises.items():
        weights = rise - overhead
        assert weights <= 0.6 * fp32_bytes, f"rank {rank}: {weights / fp32_bytes:.2f}x the fp32 weights"
    assert_same_losses(ws.losses(sharded_run), ws.losses(whole_run), 1e-4)


def run_whole_and_sharded(ws, name: str, *overrides: str) -> str:
    """The same two steps in one process (2 accumulated micro-batches) and on two FSDP ranks; the
    sharded run's log."""
    common = (f"model.tokenizer={resolve_smollm2(ws.root / 'models') / 'tokenizer.json'}", "training.max_steps=2",
              "training.save_every=null", "data.n_samples=4", "distributed.timeout_s=120", *overrides)
    ws.run(f"{name}-whole", *common, "training.batch_size=1", "training.grad_accum_steps=2")
    proc = torchrun(ws, f"{name}-sharded", *common, "training.batch_size=1", "training.grad_accum_steps=1",
                    "distributed.strategy=fsdp")
    assert proc.wait(timeout=600) == 0, ws.log_tail(f"{name}-sharded")
    return (ws.runs.parent / f"{name}-sharded.run.log").read_text()


def test_each_rank_reads_only_its_shards_and_trains_like_one_process(micro_workspace, meta_checkpoint):
    ws = micro_workspace
    directory, args = meta_checkpoint
    log = run_whole_and_sharded(ws, "model", f"model.name={directory}")
    assert "on the meta device until sharded" in log
    assert_sharded_start_up(ws, "model-whole", "model-sharded", 4 * parameters_with_heads(args, 2))


def test_a_rho1_reference_starts_sharded_too(micro_workspace, meta_checkpoint, small_checkpoint):
    ws = micro_workspace
    reference, reference_args = meta_checkpoint
    small, args = small_checkpoint
    log = run_whole_and_sharded(ws, "rho1", f"model.name={small}", "experiment.pipeline=rho1", "weighting.scheme=rho1",
                                f"rho1.reference_model={reference}", "rho1.per_head=false")
    assert f"rho1 reference: {reference} (1 head(s)), on the meta device until sharded" in log
    assert "reference: sharded over 2 ranks" in log
    fp32_bytes = 4 * (parameters_with_heads(args, 2) + parameters_with_heads(reference_args, 1))
    assert_sharded_start_up(ws, "rho1-whole", "rho1-sharded", fp32_bytes)


def test_lora_adapters_are_added_on_the_meta_device(micro_workspace, small_checkpoint):
    """LoRA layers wrap the skeleton's linear layers before sharding; each rank fills the base weights
    from the checkpoint and the adapters from their named initial values, as one process does."""
    ws = micro_workspace
    small, _ = small_checkpoint
    log = run_whole_and_sharded(ws, "lora", f"model.name={small}", "training.lora.enabled=true",
                                "training.lora.r=4", "training.lora.dropout=0", "training.lr=1e-2")
    assert "on the meta device until sharded" in log
    assert "(lora)" in log
    assert_same_losses(ws.losses("lora-sharded"), ws.losses("lora-whole"), 1e-4)
