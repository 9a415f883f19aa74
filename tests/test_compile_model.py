"""A whole quantised Llama-style model (config-built, every linear a QuantLinear) under
``torch.compile(fullgraph=True)``: one graph, no breaks, outputs equal to eager.

Two backends: ``aot_eager`` (graph capture, functionalisation and the ops' fake and autograd
registrations, bit-exact against eager; a few seconds) and ``inductor``, the default backend
(code generation and C++ compilation of the fused kernels around our ops: about 25 s of CPU
time when its cache is cold, which is why it has a test of its own)."""
from __future__ import annotations

import pytest
import torch

from flows_testutils import calib_ids, tiny_model
from layerpress import QuantLinear
from layerpress.nn.fused import FusedQuantLinear
from layerpress.flows import quantize_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", layers=2)
    # axis="auto" on this model picks both axes (per-OC and per-IC layers in one graph)
    quantize_model(m, bits=4, group_size=32, calib=calib_ids(4, 16), method="rtn", axis="auto",
                   n_samples=4, seq_len=16)
    layers = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert {x.spec.axis for x in layers} == {"oc", "ic"}
    # fused projections (the default) where two or more of a group chose the same axis: one
    # product each, so fewer layers than the 14 linears
    fused = [x for x in layers if isinstance(x, FusedQuantLinear)]
    assert fused and len(layers) == 14 - sum(len(f.parts) - 1 for f in fused)
    return m


def _gemm_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "layerpress.gemm" in str(n.target))


def test_fullgraph_aot_eager_matches_eager(model):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):  # the graph after AOT autograd, run as is
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    ids = calib_ids(2, 12, seed=7)
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    # every quantised linear in one graph. A fused layer's parts do NOT share its product in a
    # compiled graph (no Python-side cache there; AOT autograd does not merge the identical
    # calls): one call per part, each of the whole fused weight (nn/fused.py, a known cost)
    assert len(graphs) == 1 and _gemm_calls(graphs[0]) == 14

    # training through the frozen low-bit weights: the input gradients (gemm_t) reach the
    # embeddings, in one forward and one backward graph
    grads = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        fn(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert len(graphs) == 3
    assert sum(1 for n in graphs[2].graph.nodes if "layerpress.gemm_t" in str(n.target)) == 14
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0


@pytest.mark.slow  # ~20 s of a cold inductor cache on 2 idle cores (40-60 s on a loaded machine)
def test_fullgraph_inductor_matches_eager(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    ids = calib_ids(2, 12, seed=7)
    with torch.no_grad():
        want = model(input_ids=ids).logits.double()
        got = compiled(input_ids=ids).logits.double()
    # inductor fuses and reorders the float ops around our GEMMs: equal up to rounding
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert (got - want).abs().max().item() < 1e-4
