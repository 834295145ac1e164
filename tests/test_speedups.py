"""The int8 layers and the attention: a row's numbers are a function of that row alone, bit for bit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.int8_rows import RowInt8Linear


def _layer(k: int, n: int, seed: int = 0) -> RowInt8Linear:
    gen = torch.Generator().manual_seed(seed)
    return RowInt8Linear(torch.randn(n, k, generator=gen), torch.randn(n, generator=gen))


def test_int8_linear_is_the_exact_integer_product_rescaled():
    layer = _layer(96, 40)
    x = torch.randn(5, 96) * torch.tensor([0.01, 1.0, 30.0, 0.0, 2.0])[:, None]  # scales far apart, and a zero row
    scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(x / scale)
    exact = (q.double() @ layer.int8_weight.double().t()).float()  # integers: exact in float64
    # times the channel scale, then times the row scale plus the bias with one rounding (a fused multiply-add)
    expected = torch.addcmul(layer.bias, exact * layer.weight_scale, scale)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x)[3], layer.bias)  # a zero row gives the bias, not NaN
    residual = torch.randn(5, 40)
    assert torch.equal(layer.add_to(residual, x), torch.addcmul(residual, exact * layer.weight_scale, scale) + layer.bias)


def test_int8_linear_rounds_halves_to_even_as_torch_round():
    """The levels are rounded where they are quantized (not before): a row whose largest value is 127 has scale 1,
    so its halves stay halves and must round to even, as the exact product above assumes."""
    layer = _layer(96, 40)
    x = torch.randint(-254, 255, (3, 96)).float() / 2
    x[:, 0] = 127.0
    x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    exact = (torch.round(x).double() @ layer.int8_weight.double().t()).float()
    assert torch.equal(layer(x), exact * layer.weight_scale * 1.0 + layer.bias)


def test_int8_linear_is_close_to_the_float_layer():
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(64, 128, generator=gen), torch.randn(64, generator=gen)
    x = torch.randn(8, 128, generator=gen)
    error = (RowInt8Linear(weight, bias)(x) - torch.nn.functional.linear(x, weight, bias)).abs().max()
    assert error < 0.02 * (x @ weight.t()).abs().max()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 40), row=st.integers(0, 39), k=st.sampled_from([32, 96, 768]),
       n=st.sampled_from([40, 96, 2000]), spread=st.floats(0.0, 4.0))
def test_a_row_of_an_int8_batch_equals_that_row_alone(rows: int, row: int, k: int, n: int, spread: float):
    layer = _layer(k, n)
    gen = torch.Generator().manual_seed(rows * 1000 + row)
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-spread, spread, rows)[:, None]
    row = row % rows
    assert torch.equal(layer(x)[row], layer(x[row:row + 1])[0])
    assert torch.equal(layer(x.view(rows, 1, k))[row, 0], layer(x[row])) # 3-D and 1-D inputs, as prefill and decode
    residual = torch.randn(rows, n, generator=gen)
    assert torch.equal(layer.add_to(residual, x)[row], layer.add_to(residual[row:row + 1], x[row:row + 1])[0])
