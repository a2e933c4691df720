"""Value heads: shapes and dtypes, the known types, and that they can actually fit a target."""

from __future__ import annotations

import pytest
import torch

from weighted_mtp.config.schema import ValueHeadConfig
from weighted_mtp.errors import UnknownComponentError
from weighted_mtp.models.value_head import VALUE_HEADS, LinearValueHead, MLPValueHead, build_value_head


def test_registry_lists_both_heads():
    assert sorted(VALUE_HEADS) == ["linear", "mlp"]


@pytest.mark.parametrize(("kind", "cls"), [("linear", LinearValueHead), ("mlp", MLPValueHead)])
@pytest.mark.parametrize("trunk_dtype", [torch.float32, torch.bfloat16])
def test_maps_hidden_to_fp32_values(kind, cls, trunk_dtype):
    head = build_value_head(ValueHeadConfig(type=kind, hidden_size=24), dim=16)
    assert isinstance(head, cls)
    assert all(p.dtype == torch.float32 for p in head.parameters())
    values = head(torch.randn(3, 7, 16, dtype=trunk_dtype))
    assert values.shape == (3, 7) and values.dtype == torch.float32


def test_linear_head_is_an_affine_map_of_each_rms_normalised_position():
    head = build_value_head(ValueHeadConfig(type="linear"), dim=8)
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64) * 300
    linear = head.net[1]
    normed = hidden / (hidden.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * head.norm.weight.double()
    expected = normed @ linear.weight[0].double() + linear.bias[0].double()
    torch.testing.assert_close(head(hidden).double(), expected, atol=1e-5, rtol=1e-5)


def test_value_head_outputs_stay_small_on_hidden_states_of_any_scale():
    torch.manual_seed(0)
    head = build_value_head(ValueHeadConfig(type="mlp"), dim=64)
    small, large = torch.randn(4, 9, 64), torch.randn(4, 9, 64) * 1e4
    assert head(small).abs().max() < 3 and head(large).abs().max() < 3


def test_mlp_width_defaults_to_model_width():
    head = build_value_head(ValueHeadConfig(type="mlp"), dim=12)
    assert head.net[0].out_features == 12
    wide = build_value_head(ValueHeadConfig(type="mlp", hidden_size=40), dim=12)
    assert wide.net[0].out_features == 40


def test_unknown_type_names_the_field():
    with pytest.raises(UnknownComponentError, match=r"model.value_head.type: unknown value head 'mpl'; did you mean 'mlp'"):
        build_value_head(ValueHeadConfig(type="mpl"), dim=8)


def test_mlp_head_fits_a_nonlinear_target_and_backpropagates_into_the_trunk():
    torch.manual_seed(0)
    hidden = torch.randn(16, 6, 8, requires_grad=True)
    target = torch.tanh(hidden.detach()[..., 0] * hidden.detach()[..., 1])
    head = build_value_head(ValueHeadConfig(type="mlp", hidden_size=64), dim=8)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(head(hidden), target)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
