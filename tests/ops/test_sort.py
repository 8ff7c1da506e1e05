"""codegen.ops.sort: the radix sort equals torch's stable sort, exports without TopK, and IREE
compiles and runs it (IREE's own sort is an O(n^2) loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codegen.ops.forms import iree_forms
from codegen.ops.sort import RADIX_BITS, radix_sort, sort_keys, top_k_keys


@pytest.mark.parametrize("n, bound", [(1, 1), (9, 2), (1000, 50), (60_000, 2 * 43 * 1602 * 1410), (5000, 2**40)])
def test_radix_sort_equals_stable_torch_sort(n, bound):
    keys = torch.randint(0, bound, (n,), generator=torch.Generator().manual_seed(n))
    values, perm = radix_sort(keys, bound)
    expected = torch.sort(keys, stable=True)
    assert torch.equal(values, expected.values)
    assert torch.equal(perm, expected.indices)  # ties in input order


def test_radix_sort_orders_keys_at_or_above_the_bound():
    """Keys at or above ``bound`` but below the passes' 2**bits sort exactly (a chunked draft that
    padded the keys with ``bound - 1`` let its padding back into the first n for such keys:
    docs/iree.md, thirtieth session)."""
    g = torch.Generator().manual_seed(5)
    top = 1 << (RADIX_BITS * math.ceil(math.log2(1000) / RADIX_BITS))  # 1024 with 2-bit digits
    keys = torch.cat([torch.randint(0, 1000, (37,), generator=g), torch.tensor([1000, top - 1, (1000 + top) // 2, top - 1])])
    values, perm = radix_sort(keys, 1000)  # the passes' digits cover all keys below top
    expected = torch.sort(keys, stable=True)
    assert torch.equal(values, expected.values) and torch.equal(perm, expected.indices)


class _Sort(torch.nn.Module):
    def forward(self, keys):
        values, perm = sort_keys(keys, 1 << 30)
        return values, perm


def test_radix_form_exports_and_runs_in_onnxruntime_and_iree(tmp_path):
    import onnx
    import onnxruntime as ort

    from codegen.iree import compile_onnx, iree_runtime

    g = torch.Generator().manual_seed(3)
    sample = torch.randint(0, 1 << 30, (3000,), generator=g)  # digits above 2**24 too
    with iree_forms():
        program = torch.export.export(_Sort(), (sample,), dynamic_shapes=({0: torch.export.Dim("n", min=2)},), strict=False)
    path = tmp_path / "sort.onnx"
    torch.onnx.export(program, (), str(path), dynamo=True, opset_version=18, external_data=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" not in ops and "CumSum" in ops
    compile_onnx(path, tmp_path / "sort.vmfb")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runtime = iree_runtime(tmp_path / "sort.vmfb", ["keys"], static={})
    for keys in (sample, torch.randint(0, 1000, (777,), generator=g)):  # another size, many ties
        expected = torch.sort(keys, stable=True)
        for got in (session.run(None, {session.get_inputs()[0].name: keys.numpy()}), runtime.run((keys.numpy(),))):
            np.testing.assert_array_equal(np.asarray(got[0]), expected.values.numpy())
            np.testing.assert_array_equal(np.asarray(got[1]), expected.indices.numpy())
    # outside iree_forms() the export keeps torch.sort (ONNX TopK, faster in onnxruntime)
    program = torch.export.export(_Sort(), (sample,), strict=False)
    assert any("sort" in str(node.target) for node in program.graph.nodes)


class _TopK(torch.nn.Module):
    def forward(self, keys):
        return top_k_keys(keys, 200)


def test_top_k_selects_before_it_sorts_for_iree(tmp_path):
    """BEVFusion's heatmap top 200 of 324,000 unique keys: in IREE exports, the 200th largest key
    found bit by bit, the 200 keys at or above it gathered, one TopK over those; the same indices
    in the same order (eager, onnxruntime and IREE)."""
    import onnx
    import onnxruntime as ort

    from codegen.iree import compile_onnx, iree_runtime

    g = torch.Generator().manual_seed(5)
    keys = torch.randint(0, 1 << 20, (2, 324_000), generator=g) * 324_000 + torch.arange(324_000)
    # top_k_by_score's keys of a heatmap with 7 distinct scores: ties broken by the lower index
    ties = (torch.randint(0, 7, (2, 324_000), generator=g) << 50) + (324_000 - torch.arange(324_000))
    expected = [torch.topk(k, 200, dim=-1).indices for k in (keys, ties)]
    with iree_forms():
        program = torch.export.export(_TopK(), (keys,), strict=False)
    tops = [node for node in program.graph.nodes if "topk" in str(node.target)]
    assert [tuple(node.args[0].meta["val"].shape) for node in tops] == [(2, 200)]
    for k, e in zip((keys, ties), expected):
        assert torch.equal(program.module()(k), e)
    path = tmp_path / "topk.onnx"
    torch.onnx.export(program, (), str(path), dynamo=True, opset_version=18, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compile_onnx(path, tmp_path / "topk.vmfb")
    run = iree_runtime(tmp_path / "topk.vmfb", ["keys"], static={}).run
    for k, e in zip((keys, ties), expected):
        np.testing.assert_array_equal(session.run(None, {session.get_inputs()[0].name: k.numpy()})[0], e.numpy())
        np.testing.assert_array_equal(np.asarray(run((k.numpy(),))[0]), e.numpy())


def test_kth_largest_search_finds_the_value_bit_for_bit():
    """``kth_largest``'s IREE form: the order keys map back to every float32 exactly, and the
    search returns TopK's k-th value on rows with ties, negatives, signed zeros and -inf."""
    from codegen.ops.sort import _float_of_key, search_kth_largest

    rng = np.random.default_rng(6)
    bits = rng.integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    bits = bits[~np.isnan(values)].astype(np.int64)
    key = np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits + (1 << 31))
    np.testing.assert_array_equal(_float_of_key(torch.from_numpy(key)).numpy().view(np.uint32), bits.astype(np.uint32))
    g = torch.Generator().manual_seed(7)
    rows = [
        torch.randint(0, 50, (3, 5000), generator=g).float() / 7 - 3,
        torch.cat([torch.full((100,), -0.0), torch.zeros(100), -torch.rand(50, generator=g)]),
        torch.cat([torch.rand(3000, generator=g) * 1e-30, torch.full((1024,), -math.inf)]),
    ]
    for x in rows:
        for k in (1, 7, 200, 1024):
            if k <= x.shape[-1]:
                assert torch.equal(search_kth_largest(x, k), torch.topk(x, k, dim=-1).values[..., k - 1 :])


class _TopIndices(torch.nn.Module):
    def forward(self, scores):
        from codegen.ops.nms import top_k_indices

        return top_k_indices(scores, 1024)


def test_top_k_indices_takes_no_topk_in_iree(tmp_path):
    """PV-RCNN's proposals: the best 1024 of 211,200 anchor scores (``top_k_indices``).  IREE
    sorted each of its two TopKs over the whole row, O(n^2): minutes a frame.  In IREE exports
    the graph has no TopK and gives the eager indices in IREE, ties across the cut included."""
    import onnx

    from codegen.iree import compile_onnx, iree_runtime

    g = torch.Generator().manual_seed(8)
    scores = torch.rand(211_200, generator=g)
    tied = torch.randint(0, 300, (211_200,), generator=g).float() / 300  # ~700 per value
    with iree_forms():
        program = torch.export.export(_TopIndices(), (scores,), strict=False)
    path = tmp_path / "top.onnx"
    torch.onnx.export(program, (), str(path), dynamo=True, opset_version=18, external_data=False)
    assert "TopK" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    compile_onnx(path, tmp_path / "top.vmfb")
    run = iree_runtime(tmp_path / "top.vmfb", ["scores"], static={}).run
    for s in (scores, tied):
        want = torch.sort(torch.sort(s, descending=True, stable=True).indices[:1024]).values
        assert torch.equal(program.module()(s), want)
        np.testing.assert_array_equal(np.asarray(run((s.numpy(),))[0]), want.numpy())
