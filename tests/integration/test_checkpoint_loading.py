"""Single-copy loading: every format and dtype gives exactly the written weights, in memory of their own.

`build_model` reads each tensor straight into its parameter (cast on the way); these tests check the
result against the model the checkpoint was written from (cast with `.to(dtype)`), that the weights
no longer depend on the file, and the pieces that make it cheap (page release, GGUF F32 copies).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from weighted_mtp.models.checkpoints import (
    add_heads,
    TensorSource,
    build_model,
    hf,
    native,
    read_checkpoint,
    release_file_pages,
)
from weighted_mtp.models.checkpoints.gguf import GGUFTensor, read_dequantised
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def written_model(tie: bool = False) -> MTPTransformer:
    args = ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=300,
        ffn_hidden_dim=192,
        n_future_tokens=2,
        tie_embeddings=tie,
    )
    model = MTPTransformer(args)
    model.init_weights(seed=7, std=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    return model.eval()


def write_meta(model: MTPTransformer, directory: Path, n_shards: int) -> None:
    """Meta's layout: params.json and model-parallel shards, split as fairscale splits them."""
    directory.mkdir()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in model.state_dict().items():
        dim = SPLIT_DIM.get(name.split(".")[-2])
        pieces = tensor.chunk(n_shards, dim=dim) if dim is not None else [tensor] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    a = model.args
    params = {
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size,
        "n_future_tokens": a.n_future_tokens,
    }
    (directory / "params.json").write_text(json.dumps(params))


def write(kind: str, model: MTPTransformer, directory: Path) -> Path:
    if kind == "meta-1-shard":
        write_meta(model, directory, 1)
    elif kind == "meta-2-shards":
        write_meta(model, directory, 2)
    elif kind == "native":
        native.save(model, directory)
    else:  # HF: wq/wk permuted to the half-split rotary layout; the extra head in mtp_heads.safetensors
        hf.export_hf(model, directory)
    return directory


KINDS = ["meta-1-shard", "meta-2-shards", "native", "hf"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_loaded_weights_and_logits_equal_the_written_model_cast_to_dtype(tmp_path, kind, dtype):
    model = written_model(tie=kind == "native")
    loaded = build_model(read_checkpoint(write(kind, model, tmp_path / kind)), dtype=dtype)
    expected = model.to(dtype)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == dtype and torch.equal(got, tensor), name
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == model.args.tie_embeddings
    tokens = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(tokens, return_all_heads=True).logits,
            expected(tokens, return_all_heads=True).logits,
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_weights_do_not_depend_on_the_file_once_loaded(tmp_path, kind):
    """Overwriting the checkpoint in place (same size, so a mapping would not fault) leaves the model as
    it was: parameters are copies, not views of a memory-mapped file."""
    model = written_model()
    directory = write(kind, model, tmp_path / kind)
    loaded = build_model(read_checkpoint(directory))
    for path in [*directory.glob("*.pth"), *directory.glob("*.safetensors")]:
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.write(b"\0" * size)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_new_heads_on_a_loaded_bfloat16_model_are_allocated_and_seeded(tmp_path):
    directory = write("native", written_model(), tmp_path / "native")
    a = build_model(read_checkpoint(directory), dtype=torch.bfloat16)
    b = build_model(read_checkpoint(directory), dtype=torch.bfloat16)
    a = add_heads(a, 4, init="random", seed=3)
    b = add_heads(b, 4, init="random", seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert not pa.is_meta and pa.dtype == torch.bfloat16 and torch.equal(pa, pb)
    copied = build_model(read_checkpoint(directory), dtype=torch.bfloat16)
    copied = add_heads(copied, 3, init="copy")
    for new, old in zip(copied.extra_heads[-1].parameters(), copied.extra_heads[0].parameters()):
        assert torch.equal(new, old) and new.data_ptr() != old.data_ptr()


def test_tensor_sources_read_lazily_and_cast():
    reads = []
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    source = TensorSource((2, 3), lambda dtype: reads.append(dtype) or base.to(dtype))
    doubled = source.then(lambda t: t * 2)
    assert reads == [] and doubled.shape == (2, 3)
    assert torch.equal(doubled.read(torch.bfloat16), (base * 2).bfloat16())
    assert reads == [torch.bfloat16]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
def test_release_file_pages_drops_a_mapped_tensor_from_the_resident_set(tmp_path):
    def resident_file_kb() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("RssFile")).split()[1])

    values = torch.randn(8 * 2**20, generator=torch.Generator().manual_seed(0))  # 32 MB
    torch.save({"w": values}, tmp_path / "w.pth")
    mapped = torch.load(tmp_path / "w.pth", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, values)  # every page read: resident
    before = resident_file_kb()
    release_file_pages(mapped)
    assert before - resident_file_kb() > 30 * 1024
    assert torch.equal(mapped, values)  # a later read faults the pages in again from the file


def test_gguf_float32_tensors_are_copied_out_of_the_file():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = values.view(np.uint8).reshape(3, 16)  # GGUF F32 rows as bytes, like the memory-mapped file's
    tensor = GGUFTensor("blk.0.attn_norm.weight", 0, (3, 4), raw)
    out = read_dequantised(tensor, Path("x.gguf"), torch.float32)
    assert torch.equal(out, torch.from_numpy(values))
    assert not np.may_share_memory(out.numpy(), raw)
    assert read_dequantised(tensor, Path("x.gguf"), torch.bfloat16).dtype == torch.bfloat16
