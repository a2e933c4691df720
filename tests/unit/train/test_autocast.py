"""Mixed precision per device: training keeps float32 weights and autocasts its products to `dtype` on
the CPU and CUDA; float32 means no autocast; elsewhere (MPS) the weights take `dtype` itself."""

from __future__ import annotations

import torch

from weighted_mtp.config.schema import Config
from weighted_mtp.models.loading import autocast_dtype, training_autocast, weights_dtype


def test_bf16_on_the_cpu_keeps_float32_weights_and_autocasts_the_products():
    config = Config(device="cpu", dtype="bfloat16")
    assert weights_dtype(config) == torch.float32
    assert autocast_dtype(config, torch.device("cpu")) == torch.bfloat16
    with training_autocast(config, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_float32_never_autocasts_and_only_cpu_and_cuda_do():
    cpu = torch.device("cpu")
    assert autocast_dtype(Config(device="cpu", dtype="float32"), cpu) is None
    assert weights_dtype(Config(device="cpu", dtype="float32")) == torch.float32
    with training_autocast(Config(device="cpu", dtype="float32"), cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert autocast_dtype(Config(dtype="float16"), torch.device("cuda")) == torch.float16
    assert autocast_dtype(Config(dtype="bfloat16"), torch.device("mps")) is None
