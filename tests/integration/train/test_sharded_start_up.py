"""A sharded start-up under `torchrun --nproc_per_node=2` (gloo): a 110M-parameter checkpoint in Meta's
format (two model-parallel shards, untied unembedding) is built on the meta device on each rank,
sharded, and each rank reads only its rows of every tensor. Start-up memory is the rise of each
process's resident high-water mark from before loading to the end of sharding; one process loading the
whole model rises by the fp32 model plus a fixed overhead (tokenizer, data index, code: about 180 MB
here, which would hide the weights of a model this small), and each rank's rise minus that overhead is
at most 0.6x the fp32 model (its shards are 0.5x). The run trains exactly like one process holding the
whole model."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def meta_checkpoint(micro_workspace):
    """16 layers of width 512 and a 49152-token vocabulary (the micro tokenizer's): 110M parameters."""
    args = ModelArgs(dim=512, n_layers=16, n_heads=8, n_kv_heads=4, vocab_size=49152, ffn_hidden_dim=1536,
                     n_future_tokens=1, tie_embeddings=False)
    with torch.device("meta"):
        model = MTPTransformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=5, std=0.02)
    directory = micro_workspace.root / "meta-110m"
    write_meta_checkpoint(model, directory, n_shards=2)
    parameters = model.num_parameters()
    assert parameters > 100e6
    return directory, parameters


def test_each_rank_reads_only_its_shards_and_trains_like_one_process(micro_workspace, meta_checkpoint):
    ws = micro_workspace
    directory, parameters = meta_checkpoint
    common = (f"model.name={directory}", f"model.tokenizer={resolve_smollm2(ws.root / 'models') / 'tokenizer.json'}",
              "training.max_steps=2", "training.save_every=null", "data.n_samples=4", "distributed.timeout_s=120")
    ws.run("whole", *common, "training.batch_size=1", "training.grad_accum_steps=2")
    proc = torchrun(ws, "sharded", *common, "training.batch_size=1", "training.grad_accum_steps=1",
                    "distributed.strategy=fsdp")
    assert proc.wait(timeout=600) == 0, ws.log_tail("sharded")
    log = (ws.runs.parent / "sharded.run.log").read_text()
    assert "on the meta device until sharded" in log
    with_new_head = parameters + (512 * 512 * 2 + 512 * 256 * 2 + 3 * 512 * 1536 + 2 * 512)  # head 2, copied
    fp32_bytes = 4 * with_new_head
    rises = {int(rank): float(gib) * 2**30 for rank, gib in PEAK.findall(log)}
    assert sorted(rises) == [0, 1], log[-3000:]
    whole = float(PEAK.search(ws.log_tail("whole")).group(2)) * 2**30
    assert whole >= fp32_bytes  # one process holds it all
    overhead = whole - fp32_bytes  # what start-up holds besides the weights: the tokenizer, data, code
    for rank, rise in rises.items():
        weights = rise - overhead
        assert weights <= 0.6 * fp32_bytes, f"rank {rank}: {weights / fp32_bytes:.2f}x the fp32 model"
    assert_same_losses(ws.losses("sharded"), ws.losses("whole"), 1e-4)
