"""`kernels.split_k`: a one-row projection as fp32 partial products that the next fused kernel sums.

On the CPU the partials are fp32 batched products of the (upcast) inputs; CUDA runs cuBLAS with fp32
outputs, checked in tests/test_cuda.py. Which products take the route is decided while torch.compile
traces, so the routing tests trace with a backend that keeps the graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentmas.kernels import skinny_linear as skinny
from latentmas.kernels import split_k


@pytest.mark.parametrize("splits", [2, 4, 8])
def test_partials_are_the_products_of_the_slices(splits):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    weight = torch.randn(40, 64, generator=generator, dtype=torch.float64)
    partials = split_k.split_k_partials(x.float(), weight.float(), splits)
    assert partials.shape == (splits, 3, 40) and partials.dtype == torch.float32
    chunk = 64 // splits
    for s in range(splits):
        part = slice(s * chunk, (s + 1) * chunk)
        torch.testing.assert_close(partials[s].double(), x[:, part] @ weight[:, part].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(partials.sum(0).double(), x @ weight.T, atol=1e-4, rtol=1e-5)


def test_bf16_product_is_summed_in_fp32_and_rounded_once():
    """Against F.linear with fp32 accumulation: at most one bf16 step apart (a different summation
    order), and mostly equal; rounding each slice to bf16 first would be further off."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 512, generator=generator).to(torch.bfloat16)
    weight = (torch.randn(256, 512, generator=generator) * 0.05).to(torch.bfloat16)
    bias = torch.randn(256, generator=generator).to(torch.bfloat16)
    out = split_k.split_k_linear(x, weight, bias, 4)
    assert out.shape == (1, 1, 256) and out.dtype == torch.bfloat16
    reference = F.linear(x.double(), weight.double(), bias.double()).float()
    step = 2.0 ** (torch.floor(torch.log2(reference.abs())) - 7)  # one bf16 step at each value
    assert ((out.float() - reference).abs() <= step).all()
    assert (out == reference.to(torch.bfloat16)).float().mean() > 0.95


@pytest.mark.parametrize("in_features, splits, fitting", [
    (4096, 4, 4), (9728, 4, 4), (2560, 8, 8), (2560, 1, 0), (2560, 16, 0), (100, 4, 0), (96, 3, 3), (60, 3, 0), (40, 2, 0)])
def test_splits_cut_the_input_features_into_whole_16_byte_slices(in_features, splits, fitting):
    assert split_k.fitting_splits(in_features, splits) == fitting


def _traced_ops(function, *inputs):
    """The ops of the graph dynamo traces for `function(*inputs)` (run eagerly after tracing)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(function, backend=keep, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return out, [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


@pytest.fixture
def on_the_cpu(monkeypatch):
    """Let compiled steps take split-K on the CPU (the route is CUDA's; the CPU impl sums the same way)."""
    monkeypatch.setattr(split_k, "DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("rows, out_features, taken", [(1, 256, True), (2, 256, False), (1, 8192, False)])
def test_compiled_one_row_products_with_few_outputs_take_split_k(on_the_cpu, rows, out_features, taken):
    """A compiled product of one row with at most 4096 outputs runs as partials (`SPLITS["few"]` slices)
    and a sum; more rows, or many outputs (`SPLITS["many"]` is 1), stay F.linear. The result is the
    same as eagerly."""
    x = torch.randn(rows, 1, 512).to(torch.bfloat16)
    weight = (torch.randn(out_features, 512) * 0.05).to(torch.bfloat16)
    out, ops = _traced_ops(lambda a, w: skinny.skinny_linear(a, w), x, weight)
    assert (torch.ops.latentmas.split_k_partials.default in ops) == taken
    assert (F.linear in ops) != taken
    eager = skinny.skinny_linear(x, weight)
    step = 2.0 ** (torch.floor(torch.log2(eager.float().abs())) - 7)
    assert ((out.float() - eager.float()).abs() <= step).all()


def test_eager_products_and_fp32_models_never_take_split_k(on_the_cpu):
    x = torch.randn(1, 512).to(torch.bfloat16)
    weight = torch.randn(256, 512).to(torch.bfloat16)
    assert split_k.split_for(x, weight) == 0  # not compiling: the sum would be a kernel of its own
    _, ops = _traced_ops(lambda a, w: skinny.skinny_linear(a, w), x.float(), weight.float())
    assert torch.ops.latentmas.split_k_partials.default not in ops


@pytest.mark.parametrize("weight_of", [lambda w: w.t().contiguous().t(), lambda w: torch.cat([w, w], 1)[:, :512]],
                         ids=["transposed", "column-sliced"])
def test_weights_not_contiguous_in_rows_stay_f_linear(on_the_cpu, weight_of):
    """The partials view the weight as `[splits, chunk, N]` slices of contiguous rows; other layouts
    (a transposed or column-sliced weight) keep F.linear, with the same result."""
    x = torch.randn(1, 512).to(torch.bfloat16)
    weight = weight_of((torch.randn(256, 512) * 0.05).to(torch.bfloat16))
    assert weight.stride() != (512, 1)
    out, ops = _traced_ops(lambda a, w: skinny.skinny_linear(a, w), x, weight)
    assert torch.ops.latentmas.split_k_partials.default not in ops and F.linear in ops
    torch.testing.assert_close(out, F.linear(x, weight))


def test_a_dynamic_row_count_stays_f_linear(on_the_cpu):
    """A compiled step whose batch size is dynamic (batch sizes above 1) keeps F.linear: no guard on rows."""
    x = torch.randn(3, 1, 512).to(torch.bfloat16)
    weight = (torch.randn(256, 512) * 0.05).to(torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    _, ops = _traced_ops(lambda a, w: skinny.skinny_linear(a, w), x, weight)
    assert torch.ops.latentmas.split_k_partials.default not in ops and F.linear in ops


def test_split_k_under_inductor_adds_up_like_the_eager_sum(on_the_cpu):
    """Inductor (on the CPU here) compiles the partials and, fused after them, their sum and the residual
    add: within two bf16 steps of the exact result, as eagerly (which rounds between the two)."""
    x = torch.randn(1, 1, 512).to(torch.bfloat16)
    weight = (torch.randn(256, 512) * 0.05).to(torch.bfloat16)
    residual = torch.randn(1, 1, 256).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, w, r: skinny.skinny_linear(a, w) + r, fullgraph=True)(x, weight, residual)
    torch._dynamo.reset()
    eager = split_k.split_k_linear(x, weight, None, split_k.SPLITS["few"]) + residual
    product = x.double() @ weight.double().T
    exact = product + residual.double()
    step = 2.0 ** (torch.floor(torch.log2(product.abs() + residual.double().abs())) - 7)
    for out in (compiled, eager):
        assert ((out.double() - exact).abs() <= 2 * step).all()
