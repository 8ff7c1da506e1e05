"""Graph forms: rewrites of the exported ONNX graph into forms CPU runtimes run faster.

Each form computes the same function (only the summation order may differ) and is checked
against onnxruntime on a miniature graph in the tests; every export validates the final graph
against the eager model.

- ``cpu_forms`` (applied to ``model.onnx`` itself, so onnxruntime and IREE both get them):
  ``fold_constants`` (``CastLike(constant, x)`` and small constant shape arithmetic as
  initializers: a Conv's zero bias becomes a constant),
  ``identity_transposes_as_identities`` (no copy for an identity permutation),
  ``fold_deconv_batchnorms`` (a ConvTranspose's BatchNorm into its weights),
  ``rewrite_deconvs`` (stride-sized ConvTranspose as MatMul + pixel shuffle),
  ``split_concat_heads`` (a channel Concat read only by 1x1 Convs as summed per-branch Convs),
  ``split_concat_matmuls`` (``MatMul(Concat(a, Tile(max)), W)`` as two MatMuls),
  ``fold_transposed_batchnorms`` (PFN / VFE BatchNorms between transposes into their MatMuls),
  ``hoist_max_over_bias_relu`` (a per-voxel max taken before the ReLU and shifts, not after),
  ``select_scatters_as_concats`` (``x[..., c] = u`` as a Concat instead of a ScatterElements),
  ``flatten_row_scatters`` (a row-wise max / add ScatterElements on 1-D views: faster per element);
- ``onnxruntime_forms`` (``model.onnx`` only, after the forms above; IREE's copy is saved before):
  ``deconvs_as_pointwise_convs`` (the deconvolution MatMuls as 1x1 Convs + DepthToSpace, the heads
  taken before their shuffle as grouped 1x1 Convs: onnxruntime's NCHWc kernels);
- ``drop_empty_concat_inputs``, ``list_constants_as_initializers`` and
  ``row_max_scatters_as_scatter_nd``: constructs IREE's ONNX importer rejects, and
  ``split_long_reductions``: long f32 sums IREE adds in order, as sums of sums (and attentions
  over many keys as IREE's fused attention per block of keys), and
  ``strided_pointwise_convs_as_slices``: strided 1x1 Convs IREE runs as slow generic reductions,
  ``grouped_deconvs_as_convs``: grouped ConvTransposes IREE rejects,
  ``strided_convs_as_space_to_depth``: strided convolutions over few channels (ResNet's stem) as
  stride-1 ones over the input rearranged space-to-depth, where IREE data-tiles convolutions,
  ``pointwise_convs_as_matmuls``: 1x1 convolutions as channels-last MatMuls where IREE does not
  data-tile matmuls, and there ``chunked_long_matmuls``: static MatMuls with a long K as sums of
  MatMuls over K chunks,
  ``row_max_pools_as_reductions``: one-row MaxPools IREE runs as data-tiled convolutions,
  ``channels_last_concats``: channel Concats of channels-last branches taken channels-last,
  ``cancel_transpose_pairs``: Transposes that undo each other dropped,
  and, where IREE's flags send convolutions through im2col, ``winograd_convs``: wide stride-1
  3x3 convolutions (and stride-2 ones on the same input) as Winograd F(4x4, 3x3), and
  ``shifted_output_convs``: the other stride-1 convolutions as one MatMul over all kernel taps +
  shifted sums (applied to the IREE copy only, ``codegen.iree.iree_onnx``).

docs/iree.md and docs/bench_models.md have the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _static_shape(shapes: dict, name: str) -> list[int] | None:
    dims = shapes.get(name)
    if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return dims


@dataclass
class Unshuffled:
    """A deconvolution result kept before its pixel shuffle: ``name`` is ``[n, h, w, kh, kw, c]``
    (bias added); the NCHW result is ``shuffle(name)``."""

    name: str
    n: int
    h: int
    w: int
    kh: int
    kw: int


def _shuffle_to_nchw(nodes: list, graph, u: Unshuffled, src: str, channels: int, out: str, p: str) -> None:
    """``[n, h, w, kh, kw, c]`` -> ``[n, h, kh, w, kw, c]`` -> ``[n, h*kh, w*kw, c]`` -> NCHW ``out``."""
    from onnx import helper, numpy_helper

    shape = np.array([u.n, u.h * u.kh, u.w * u.kw, channels], np.int64)
    graph.initializer.append(numpy_helper.from_array(shape, f"{p}_nhwc_shape"))
    nodes += [
        helper.make_node("Transpose", [src], [f"{p}_shuf"], perm=[0, 1, 3, 2, 4, 5], name=f"{p}_shuf"),
        helper.make_node("Reshape", [f"{p}_shuf", f"{p}_nhwc_shape"], [f"{p}_out_nhwc"], name=f"{p}_out_nhwc"),
        # back to NCHW: IREE's transpose propagation folds this into the consumer's layout
        helper.make_node("Transpose", [f"{p}_out_nhwc"], [out], perm=[0, 3, 1, 2], name=f"{p}_nchw"),
    ]


def rewrite_deconvs(model, unshuffled: dict[str, Unshuffled]) -> list[str]:
    """Replace each ConvTranspose whose kernel equals its stride (no padding, no groups) by a
    MatMul and a pixel shuffle (Reshape, Transpose, Reshape).

    Such a deconvolution writes every output pixel from exactly one input pixel:
    ``y[n, co, i*s + a, j*s + b] = sum_ci x[n, ci, i, j] * w[ci, co, a, b]``. IREE lowers
    ConvTranspose to a convolution over the zero-stuffed input, i.e. s*s times the work, most
    of it multiplying zeros: SECONDFPN's 4x4/stride-4 deblock took 7.9 of 11.5 s of the
    PointPillars head. The MatMul form is the same sum over ``ci`` (only the summation order
    may differ). Nodes with other attributes, or unknown input shapes, are left alone.
    ``unshuffled`` gets each result's tensor before the shuffle (see ``split_concat_heads``).
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    done = []
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
        x_shape = _static_shape(shapes, node.input[0]) if weight is not None else None
        kernel = list(weight.dims[2:]) if weight is not None else []
        if (
            weight is None
            or x_shape is None
            or len(kernel) != 2
            or list(attrs.get("strides", [1, 1])) != kernel
            or any(attrs.get("pads", [0] * 4))
            or any(attrs.get("output_padding", [0, 0]))
            or list(attrs.get("dilations", [1, 1])) != [1, 1]
            or attrs.get("group", 1) != 1
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits)
        ):
            nodes.append(node)
            continue
        n, ci, h, w = x_shape
        _, co, kh, kw = weight.dims
        p = f"{_label(node)}_form"
        # columns ordered (kh, kw, co): the pixel shuffle then moves whole channel vectors
        w2 = numpy_helper.to_array(weight).transpose(0, 2, 3, 1).reshape(ci, kh * kw * co)
        graph.initializer.append(numpy_helper.from_array(w2, f"{p}_w"))
        graph.initializer.append(numpy_helper.from_array(np.array([n, h, w, kh, kw, co], np.int64), f"{p}_6d_shape"))
        nodes += [
            helper.make_node("Transpose", [node.input[0]], [f"{p}_nhwc"], perm=[0, 2, 3, 1], name=f"{p}_nhwc"),
            helper.make_node("MatMul", [f"{p}_nhwc", f"{p}_w"], [f"{p}_mm"], name=f"{p}_mm"),
            helper.make_node("Reshape", [f"{p}_mm", f"{p}_6d_shape"], [f"{p}_6d"], name=f"{p}_6d"),
        ]
        pre = f"{p}_6d"
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]]).reshape(co)
            graph.initializer.append(numpy_helper.from_array(bias, f"{p}_bias"))
            nodes.append(helper.make_node("Add", [pre, f"{p}_bias"], [f"{p}_biased"], name=f"{p}_bias"))
            pre = f"{p}_biased"
        u = Unshuffled(pre, n, h, w, kh, kw)
        _shuffle_to_nchw(nodes, graph, u, pre, co, node.output[0], p)
        unshuffled[node.output[0]] = u
        done.append(f"ConvTranspose {_label(node)} {kh}x{kw}/{kh} {ci}->{co} as MatMul + pixel shuffle")
    _set_nodes(model, nodes, prune=False)
    onnx.checker.check_model(model)
    return done


def _is_pointwise_conv(node, inits, helper) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    return (
        node.op_type == "Conv"
        and weight is not None
        and list(weight.dims[2:]) == [1, 1]
        and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
        and attrs.get("group", 1) == 1
        and not any(attrs.get("pads", [0] * 4))
        and list(attrs.get("strides", [1, 1])) == [1, 1]
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def _channel_concat_readers(node, readers: dict, outputs: set, shapes: dict, axes: tuple) -> tuple[list, list] | None:
    """``(readers, channels of each part)`` of ``node`` when it is a ``Concat`` along the channels
    (an axis in ``axes``) of parts with static channel counts, read by some node and not a graph
    output; else None. The start of the forms that take a Concat's readers part by part
    (``split_concat_heads``, ``concat_convs_as_partial_sums``)."""
    from onnx import helper

    if node.op_type != "Concat" or helper.get_attribute_value(node.attribute[0]) not in axes:
        return None
    users = readers.get(node.output[0], [])
    widths = [(_static_shape(shapes, name) or [None, None])[1] for name in node.input]
    if not users or node.output[0] in outputs or None in widths:
        return None
    return users, widths


def split_concat_heads(model, unshuffled: dict[str, Unshuffled]) -> list[str]:
    """A channel Concat read only by 1x1 Convs (SECONDFPN's output and the Anchor3DHead's
    cls/reg/dir convs) becomes one 1x1 Conv per concatenated input, summed, with the heads'
    output channels side by side, and a Split into the heads' outputs.

    ``conv(concat(a, b, c), W) = conv(a, W_a) + conv(b, W_b) + conv(c, W_c)``: the same dot
    products, split along the input channels. IREE otherwise materialises the concat with
    strided copies (channels are the innermost NHWC axis) and reads the 384-channel result once
    per head; here each branch is read once, straight from the deconvolution that wrote it.

    A branch that is ``Relu(deconvolution)`` (``unshuffled``) gets its 1x1 Conv before the
    deconvolution's pixel shuffle: a per-pixel map (ReLU, a 1x1 conv) commutes with moving
    pixels, and the shuffle then moves the 20 head channels instead of 128.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _readers(graph)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list] = {}  # id(node) -> nodes replacing it (empty: dropped)
    done = []
    for node in graph.node:
        found = _channel_concat_readers(node, consumers, outputs, shapes, axes=(1,))
        if found is None or not all(_is_pointwise_conv(u, inits, helper) for u in found[0]):
            continue
        users, widths = found
        p = f"{_label(node)}_form"
        weights = [numpy_helper.to_array(inits[u.input[1]])[:, :, 0, 0] for u in users]
        biases = [
            numpy_helper.to_array(inits[u.input[2]]) if len(u.input) > 2 and u.input[2] else np.zeros(w.shape[0], w.dtype)
            for u, w in zip(users, weights)
        ]
        weight, bias = np.concatenate(weights), np.concatenate(biases)  # [out, in], [out]
        new, parts, start, early = [], [], 0, 0
        for j, (name, width) in enumerate(zip(node.input, widths)):
            wj = np.ascontiguousarray(weight[:, start : start + width])
            relu = producer.get(name)
            u = unshuffled.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
            if u is not None and len(consumers.get(name, [])) == 1:
                # Relu and the 1x1 conv on [n, h, w, kh, kw, c], then the shuffle
                # as a 2-D MatMul: IREE lowers a 6-D one to a broadcast and a matvec (7x slower)
                rows, out6 = [-1, width], [u.n, u.h, u.w, u.kh, u.kw, weight.shape[0]]
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(wj.T), f"{p}_w{j}"))
                graph.initializer.append(numpy_helper.from_array(np.array(rows, np.int64), f"{p}_rows{j}"))
                graph.initializer.append(numpy_helper.from_array(np.array(out6, np.int64), f"{p}_6d{j}"))
                new += [
                    helper.make_node("Relu", [u.name], [f"{p}_relu{j}"], name=f"{p}_relu{j}"),
                    helper.make_node("Reshape", [f"{p}_relu{j}", f"{p}_rows{j}"], [f"{p}_2d{j}"], name=f"{p}_2d{j}"),
                    helper.make_node("MatMul", [f"{p}_2d{j}", f"{p}_w{j}"], [f"{p}_mm{j}"], name=f"{p}_mm{j}"),
                    helper.make_node("Reshape", [f"{p}_mm{j}", f"{p}_6d{j}"], [f"{p}_mm6d{j}"], name=f"{p}_mm6d{j}"),
                ]
                _shuffle_to_nchw(new, graph, u, f"{p}_mm6d{j}", weight.shape[0], f"{p}_part{j}", f"{p}_part{j}")
                early += 1
            else:
                graph.initializer.append(numpy_helper.from_array(wj[:, :, None, None], f"{p}_w{j}"))
                new.append(helper.make_node("Conv", [name, f"{p}_w{j}"], [f"{p}_part{j}"], kernel_shape=[1, 1], name=f"{p}_part{j}"))
            parts.append(f"{p}_part{j}")
            start += width
        total = parts[0]
        for j, part in enumerate(parts[1:], 1):
            new.append(helper.make_node("Add", [total, part], [f"{p}_sum{j}"], name=f"{p}_sum{j}"))
            total = f"{p}_sum{j}"
        graph.initializer.append(numpy_helper.from_array(bias.reshape(1, -1, 1, 1), f"{p}_b"))
        graph.initializer.append(numpy_helper.from_array(np.array([w.shape[0] for w in weights], np.int64), f"{p}_split"))
        new += [
            helper.make_node("Add", [total, f"{p}_b"], [f"{p}_biased"], name=f"{p}_bias"),
            helper.make_node("Split", [f"{p}_biased", f"{p}_split"], [u.output[0] for u in users], axis=1, name=f"{p}_split"),
        ]
        replaced[id(node)] = new
        for u in users:
            replaced[id(u)] = []
        done.append(
            f"Concat {_label(node)} of {len(widths)} ({'+'.join(map(str, widths))} channels) into "
            f"{len(users)} 1x1 Convs as {len(widths)} summed 1x1 Convs + Split"
            + (f" ({early} before their deconvolution's pixel shuffle)" if early else "")
        )
    nodes = [n for node in graph.node for n in replaced.get(id(node), [node])]
    _set_nodes(model, nodes)
    return done


def deconvs_as_pointwise_convs(model) -> list[str]:
    """onnxruntime's form of ``rewrite_deconvs`` (and of ``split_concat_heads``' parts taken
    before the pixel shuffle): each deconvolution MatMul becomes a 1x1 Conv whose output
    channels are ordered (kh, kw, co), and its pixel shuffle a ``DepthToSpace`` (DCR).

    onnxruntime runs the channels-last MatMul (after a Transpose of its NCHW input) at 60-130
    GFLOP/s on one AVX-512 core (PointPillars KITTI's three), its NCHWc 1x1 Conv with the bias and
    a ReLU fused closer to its 3x3 convolutions' ~170. A head taken before the shuffle (ReLU, 2-D MatMul with the head's 1x1
    weights, shuffle) becomes ReLU (fused into the Conv), a grouped 1x1 Conv with one group per
    kernel position (each group's output channels padded to a multiple of 16: onnxruntime runs a
    grouped Conv in its NCHWc kernels only then), a Slice of the padding and a ``DepthToSpace``.
    A shuffled result read only by a ReLU takes the ReLU before the shuffle (fused into the Conv).
    Only the exact node chains ``rewrite_deconvs`` / ``split_concat_heads`` emit are rewritten; the
    sums per output are the same products (only their order may differ). IREE keeps the MatMul
    form (its data-tiled matmuls; ``codegen.iree.iree_onnx`` starts from the graph before this).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def only_reader(name: str, op: str):
        users = readers.get(name, [])
        if len(users) == 1 and users[0].op_type == op and name not in outputs:
            return users[0]
        return None

    def const(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def shuffle_chain(name: str, n, h, w, k, c):
        """The three nodes of ``_shuffle_to_nchw`` reading ``name`` (6-D), or None."""
        t1 = only_reader(name, "Transpose")
        r = t1 is not None and _perm(t1) == [0, 1, 3, 2, 4, 5] and only_reader(t1.output[0], "Reshape")
        shape = const(r.input[1]) if r else None
        t2 = r and shape is not None and shape.tolist() == [n, h * k, w * k, c] and only_reader(r.output[0], "Transpose")
        if not t2 or _perm(t2) != NCHW:
            return None
        return [t1, r, t2]

    removed: set[int] = set()
    placed: dict[int, list] = {}  # id(node) -> the nodes emitted in its place
    done = []
    for mm in graph.node:
        tr = producer.get(mm.input[0]) if mm.op_type == "MatMul" else None
        w2 = const(mm.input[1]) if tr is not None else None
        if tr is None or tr.op_type != "Transpose" or _perm(tr) != NHWC or w2 is None or w2.ndim != 2:
            continue
        r6 = only_reader(mm.output[0], "Reshape")
        shape6 = const(r6.input[1]) if r6 is not None else None
        if shape6 is None or shape6.size != 6 or len(readers.get(tr.output[0], [])) != 1:
            continue
        n, h, w, kh, kw, co = (int(v) for v in shape6)
        ci = w2.shape[0]
        if kh != kw or w2.shape[1] != kh * kw * co or min(n, h, w, co) <= 0:
            continue
        chain, head = [tr, mm, r6], r6.output[0]
        bias = None
        add = only_reader(head, "Add")
        if add is not None and add.input[0] == head and getattr(const(add.input[1]), "shape", None) == (co,):
            bias = const(add.input[1])
            chain.append(add)
            head = add.output[0]
        k, p = kh, f"{_label(mm)}_ort"
        users = readers.get(head, [])
        plans = []
        for user in users:
            if user.op_type == "Transpose":
                nodes = shuffle_chain(head, n, h, w, k, co)
                if nodes is None:
                    break
                relu = only_reader(nodes[-1].output[0], "Relu")
                plans.append(("shuffle", nodes + ([relu] if relu is not None else [])))
            elif user.op_type == "Relu":
                rows = only_reader(user.output[0], "Reshape")
                rows_shape = const(rows.input[1]) if rows is not None else None
                hm = rows_shape is not None and rows_shape.tolist() == [-1, co] and only_reader(rows.output[0], "MatMul")
                wh = const(hm.input[1]) if hm else None
                hr6 = wh is not None and wh.ndim == 2 and wh.shape[0] == co and only_reader(hm.output[0], "Reshape")
                nh = wh.shape[1] if hr6 else 0
                s6 = const(hr6.input[1]) if hr6 else None
                if s6 is None or s6.tolist() != [n, h, w, k, k, nh]:
                    break
                nodes = shuffle_chain(hr6.output[0], n, h, w, k, nh)
                if nodes is None:
                    break
                plans.append(("head", [user, rows, hm, hr6] + nodes))
            else:
                break
        if not users or len(plans) != len(users):
            continue
        # the conv: output channel (a, b, c) = a * k * co + b * co + c, DCR's order
        wc = w2.reshape(ci, k, k, co).transpose(1, 2, 3, 0).reshape(k * k * co, ci, 1, 1)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(wc), f"{p}_w"))
        conv_in = [tr.input[0], f"{p}_w"]
        if bias is not None:
            graph.initializer.append(numpy_helper.from_array(np.tile(bias, k * k), f"{p}_b"))
            conv_in.append(f"{p}_b")
        new = [helper.make_node("Conv", conv_in, [f"{p}_conv"], kernel_shape=[1, 1], name=f"{p}_conv")]
        relu_in = None  # the one ReLU of the conv's result, if a plan needs it
        for j, (kind, nodes) in enumerate(plans):
            if kind == "head" or nodes[-1].op_type == "Relu":
                if relu_in is None:
                    new.append(helper.make_node("Relu", [f"{p}_conv"], [f"{p}_relu"], name=f"{p}_relu"))
                    relu_in = f"{p}_relu"
            if kind == "shuffle":
                src, out = (relu_in if nodes[-1].op_type == "Relu" else f"{p}_conv"), nodes[-1].output[0]
            else:
                wh = const(nodes[2].input[1])  # [co, nh]
                nh = wh.shape[1]
                nhp = nh if k == 1 else -(-nh // 16) * 16
                whp = np.zeros((k * k, nhp, co), wh.dtype)
                whp[:, :nh] = wh.T
                graph.initializer.append(numpy_helper.from_array(whp.reshape(k * k * nhp, co, 1, 1), f"{p}_hw{j}"))
                new.append(
                    helper.make_node(
                        "Conv", [relu_in, f"{p}_hw{j}"], [f"{p}_h{j}"], kernel_shape=[1, 1], group=k * k, name=f"{p}_h{j}"
                    )
                )
                src, out = f"{p}_h{j}", nodes[-1].output[0]
                if nhp != nh:
                    for name, value in (
                        (f"{p}_h5{j}", [n, k * k, nhp, h, w]),
                        (f"{p}_h4{j}", [n, k * k * nh, h, w]),
                        (f"{p}_from{j}", [0]),
                        (f"{p}_to{j}", [nh]),
                        (f"{p}_axis{j}", [2]),
                    ):
                        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
                    sliced = [f"{p}_g{j}", f"{p}_from{j}", f"{p}_to{j}", f"{p}_axis{j}"]
                    new += [
                        helper.make_node("Reshape", [src, f"{p}_h5{j}"], [f"{p}_g{j}"], name=f"{p}_g{j}"),
                        helper.make_node("Slice", sliced, [f"{p}_s{j}"], name=f"{p}_s{j}"),
                        helper.make_node("Reshape", [f"{p}_s{j}", f"{p}_h4{j}"], [f"{p}_u{j}"], name=f"{p}_u{j}"),
                    ]
                    src = f"{p}_u{j}"
            if k > 1:
                new.append(helper.make_node("DepthToSpace", [src], [out], blocksize=k, mode="DCR", name=f"{p}_d2s{j}"))
            else:
                new.append(helper.make_node("Identity", [src], [out], name=f"{p}_id{j}"))
            removed.update(id(x) for x in nodes)
        removed.update(id(x) for x in chain)
        placed[id(mm)] = new
        heads = sum(kind == "head" for kind, _ in plans)
        done.append(
            f"deconvolution MatMul {_label(mm)} ({ci}->{co}, {k}x{k}) as a 1x1 Conv + DepthToSpace for onnxruntime"
            + (f" ({heads} head(s) as grouped 1x1 Convs before the shuffle)" if heads else "")
        )
    if done:
        nodes = [x for node in graph.node for x in placed.get(id(node), [] if id(node) in removed else [node])]
        _set_nodes(model, nodes)
        topological_sort(graph)
    return done


def split_concat_matmuls(model) -> list[str]:
    """``MatMul(Concat(a, Tile(m), axis=-1), W)`` -> ``MatMul(a, W_a) + MatMul(m, W_m)``.

    VFE layers (HardVFE, the SECOND/MVX voxel encoders) concatenate each point's features with
    the voxel's max feature repeated over the points, then apply a linear layer. Split along the
    concatenated channels the product is the same sum; the repeated part is then multiplied once
    per voxel instead of once per point, and the repeat and the concat (strided copies in IREE)
    disappear: the sum broadcasts ``m`` back over the points. Tile/Expand inputs are only
    looked through when they repeat size-1 axes (so broadcasting restores them exactly).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    producer = {out: node for node in graph.node for out in node.output}

    def unrepeated(name: str) -> str:
        node = producer.get(name)
        if node is not None and node.op_type == "Tile" and node.input[1] in inits:
            repeats = numpy_helper.to_array(inits[node.input[1]]).tolist()
            src = shapes.get(node.input[0])
            if src and len(src) == len(repeats) and repeats[-1] == 1 and all(r == 1 or s == 1 for r, s in zip(repeats, src)):
                return unrepeated(node.input[0])
        if node is not None and node.op_type == "Expand":
            src, out = shapes.get(node.input[0]), shapes.get(name)
            if src and out and len(src) == len(out) and src[-1] is not None and src[-1] == out[-1]:
                return unrepeated(node.input[0])
        return name

    done = []
    nodes = []
    for node in graph.node:
        concat = producer.get(node.input[0]) if node.op_type == "MatMul" else None
        if concat is None or concat.op_type != "Concat":
            nodes.append(node)
            continue
        weight = inits.get(node.input[1])
        rank = len(shapes.get(node.input[0]) or [])
        axis = next((helper.get_attribute_value(a) for a in concat.attribute if a.name == "axis"), None)
        widths = [(shapes.get(name) or [None])[-1] for name in concat.input]
        if (
            weight is None
            or len(weight.dims) != 2
            or rank < 2
            or axis not in (-1, rank - 1)
            or None in widths
            or sum(widths) != weight.dims[0]
        ):
            nodes.append(node)
            continue
        p = f"{_label(node)}_form"
        w = numpy_helper.to_array(weight)
        start, parts = 0, []
        for j, (name, width) in enumerate(zip(concat.input, widths)):
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[start : start + width]), f"{p}_w{j}"))
            nodes.append(helper.make_node("MatMul", [unrepeated(name), f"{p}_w{j}"], [f"{p}_part{j}"], name=f"{p}_part{j}"))
            parts.append(f"{p}_part{j}")
            start += width
        total = parts[0]
        for j, part in enumerate(parts[1:], 1):
            out = node.output[0] if j == len(parts) - 1 else f"{p}_sum{j}"
            nodes.append(helper.make_node("Add", [total, part], [out], name=f"{p}_sum{j}"))
            total = out
        repeated = sum(unrepeated(n) != n for n in concat.input)
        done.append(
            f"MatMul {_label(node)} of Concat {_label(concat)} ({'+'.join(map(str, widths))} channels) as {len(parts)} "
            f"summed MatMuls{f' ({repeated} on the unrepeated input)' if repeated else ''}"
        )
    _set_nodes(model, nodes)
    return done


# ops whose all-constant instances fold_constants evaluates (shape arithmetic and small values)
_FOLDABLE = {
    "Shape", "Expand", "Cast", "Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Reshape", "Identity", "Range",
    "Add", "Sub", "Mul",
}
_FOLD_MAX_ELEMENTS = 1 << 16  # larger results stay computed (no big initializers in model.onnx)


def fold_constants(model) -> list[str]:
    """``CastLike(constant, x)`` -> the constant in ``x``'s element type, then small all-constant
    shape arithmetic (``_FOLDABLE``) -> initializers.

    torch's exporter writes a convolution without bias as ``Conv(x, w, Expand(CastLike(0, x),
    Shape(w)[:1]))``, and Python scalars in arithmetic as ``CastLike(c, x)``. ``CastLike``
    reads ``x`` (only its type), so onnxruntime does not treat the result as a constant: the
    bias is not an initializer, the Conv keeps its BatchNorm unfused and is not moved to the
    blocked NCHWc layout (MLAS's fast path). Graphs past ``export.OPTIMIZE_MAX_NODES`` skip the
    ONNX optimiser that folds these: SECOND's RPN convs ran at 127 GFLOP/s instead of ~160 (one
    thread, 1513 -> 1275 ms per frame). The other forms then see constant biases too
    (``fold_deconv_batchnorms``). ``CastLike(ConstantOfShape(shape), x)`` (``new_zeros`` of a
    large canvas) becomes a ``ConstantOfShape`` of ``x``'s type. The values are the same.
    Small constant Add/Sub/Mul fold too: GroupNorm's affine, unoptimised, is
    ``Unsqueeze(weight, Range(1, Sub(c, 1), 1))``, which IREE imports as a scalar (PGD).
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    types = _elem_types(graph)
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            constants[node.output[0]], types[node.output[0]] = tensor, tensor.data_type
    nodes, castlikes, folded, fills = [], 0, 0, 0
    filled = {}  # ConstantOfShape outputs -> node
    for node in graph.node:  # in topological order: a folded result can feed the next fold
        value = None
        if node.op_type == "ConstantOfShape":
            filled[node.output[0]] = node
        if node.op_type == "CastLike" and node.input[0] in filled and types.get(node.input[1]):
            # a zeros / full buffer made in another type and cast (``new_zeros`` of a canvas:
            # 36 MB cast per SECOND frame): fill it in the target type directly
            fill = filled[node.input[0]]
            old = [a.t for a in fill.attribute if a.name == "value"]
            array = numpy_helper.to_array(old[0]) if old else np.zeros(1, np.float32)
            array = array.astype(helper.tensor_dtype_to_np_dtype(types[node.input[1]]))
            nodes.append(helper.make_node("ConstantOfShape", [fill.input[0]], [node.output[0]], name=node.name,
                                          value=numpy_helper.from_array(array.reshape(1))))
            fills += 1
            continue
        if node.op_type == "CastLike" and node.input[0] in constants and types.get(node.input[1]):
            array = numpy_helper.to_array(constants[node.input[0]])
            value = array.astype(helper.tensor_dtype_to_np_dtype(types[node.input[1]]))
            castlikes += 1
        elif node.op_type in _FOLDABLE and len(node.output) == 1 and all(i in constants for i in node.input if i):
            inputs = [constants[i] for i in node.input if i]
            if all(np.prod(t.dims, dtype=np.int64) <= _FOLD_MAX_ELEMENTS for t in inputs):
                one = helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(node.output[0])], inputs)
                result = ReferenceEvaluator(helper.make_model(one, opset_imports=model.opset_import)).run(None, {})[0]
                if np.asarray(result).size <= _FOLD_MAX_ELEMENTS:
                    value = np.asarray(result)
                    folded += 1
        if value is None:
            nodes.append(node)
            continue
        tensor = numpy_helper.from_array(value, node.output[0])
        graph.initializer.append(tensor)
        constants[node.output[0]], types[node.output[0]] = tensor, tensor.data_type
    if not castlikes and not folded and not fills:
        return []
    _set_nodes(model, nodes, prune=False)
    # a folded value's old type may lack its shape (inferred before the fold, e.g. an Unsqueeze
    # with computed axes): dropped, or shape inference keeps it and its consumers stay unshaped
    kept = [v for v in graph.value_info if v.name not in constants]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    remove_dead_nodes(model)
    parts = [f"{castlikes} CastLike of constants"] * bool(castlikes) + [f"{folded} constant shape ops"] * bool(folded)
    done = [" and ".join(parts) + " as initializers"] if parts else []
    return done + [f"{fills} CastLike of ConstantOfShape as fills of the target type"] * bool(fills)


def identity_transposes_as_identities(model) -> list[str]:
    """``Transpose`` with the identity permutation -> ``Identity`` (which onnxruntime and IREE
    drop). torch's exporter writes one per ``index_put`` and ``t()`` of a 1-D or already-ordered
    tensor in the unoptimised large graphs (SECOND: 499, CenterPoint voxel: 1110); onnxruntime
    copies the tensor for each (SECOND's [70400, 128] canvas: 10 ms on one thread)."""
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.op_type != "Transpose":
            continue
        perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
        if perm is None or perm != list(range(len(perm))):
            continue
        node.op_type = "Identity"
        del node.attribute[:]
        count += 1
    return [f"{count} identity Transposes as Identity"] if count else []


def _batchnorm_affine(bn, inits) -> tuple[np.ndarray, np.ndarray]:
    """An inference BatchNormalization with constant statistics as ``x * scale + shift`` per
    channel (float64): ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``."""
    from onnx import helper, numpy_helper

    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
    eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def fold_deconv_batchnorms(model) -> list[str]:
    """``BatchNormalization(ConvTranspose(x, w, b))`` -> ``ConvTranspose(x, w', b')``.

    onnxruntime fuses a BatchNorm into a Conv but not into a ConvTranspose, and the ONNX
    optimiser that folds it is skipped past ``export.OPTIMIZE_MAX_NODES`` (SECOND's neck). With
    the BatchNorm folded, ``rewrite_deconvs`` and ``split_concat_heads`` see the
    ``Relu(deconvolution)`` they rewrite (the head's 1x1 convs before the pixel shuffle). Per
    output channel ``s = gamma / sqrt(var + eps)``: ``w'[:, c] = w[:, c] s[c]``,
    ``b' = (b - mean) s + beta``. Only ungrouped ConvTransposes with constant weights (and
    bias) read by the BatchNorm alone.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _reader_counts(graph)
    done, dropped = [], set()
    for bn in graph.node:
        deconv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if deconv is None or deconv.op_type != "ConvTranspose" or readers.get(deconv.output[0]) != 1:
            continue
        group = next((helper.get_attribute_value(a) for a in deconv.attribute if a.name == "group"), 1)
        bias = deconv.input[2] if len(deconv.input) > 2 and deconv.input[2] else None
        if group != 1 or len([o for o in bn.output if o]) != 1 or deconv.input[1] not in inits or (bias and bias not in inits):
            continue
        if not all(name in inits for name in bn.input[1:5]):
            continue
        scale, shift = _batchnorm_affine(bn, inits)
        w = numpy_helper.to_array(inits[deconv.input[1]]).astype(np.float64)  # [in, out, kh, kw]
        b = numpy_helper.to_array(inits[bias]).astype(np.float64) if bias else np.zeros(w.shape[1])
        p = f"{_label(bn)}_form"
        graph.initializer.append(numpy_helper.from_array((w * scale[None, :, None, None]).astype(np.float32), f"{p}_w"))
        graph.initializer.append(numpy_helper.from_array((b * scale + shift).astype(np.float32), f"{p}_b"))
        del deconv.input[1:]
        deconv.input.extend([f"{p}_w", f"{p}_b"])
        deconv.output[0] = bn.output[0]
        dropped.add(id(bn))
        done.append(f"BatchNormalization {_label(bn)} folded into ConvTranspose {_label(deconv)} ({len(scale)} channels)")
    if not done:
        return []
    kept = [n for n in graph.node if id(n) not in dropped]
    _set_nodes(model, kept)
    return done


def fold_transposed_batchnorms(model) -> list[str]:
    """``Transpose(BatchNorm(Transpose(L)))`` -> ``L' + t`` where ``L`` is a MatMul by a constant
    weight or a sum of such MatMuls (``split_concat_matmuls``'s form of a VFE layer).

    PillarFeatureNet's PFNLayer and HardVFE's VFE layers apply a bias-free linear layer, then a
    BatchNorm1d over the output channels, with the features permuted to channels-first around
    it and back after. onnxruntime fuses a BatchNorm only into a Conv that feeds it directly, so
    here it ran unfused, between two transposes. In inference the BatchNorm is one scale and
    shift per channel, ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``: ``s`` folds
    into each weight's columns (``L'``) and ``t`` becomes one Add. Only the exact pattern is
    rewritten: every intermediate has one reader, the first permutation moves the last axis to
    axis 1, and the second one undoes it.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _reader_counts(graph)

    def matmuls(name: str) -> list | None:
        """The MatMuls by constant 2-D weights whose sum ``name`` is, each output read once."""
        node = producer.get(name)
        if node is None or readers.get(name, 0) != 1:
            return None
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            return [node]
        if node.op_type == "Add":
            a, b = matmuls(node.input[0]), matmuls(node.input[1])
            return a + b if a is not None and b is not None else None
        return None

    found = {}  # second transpose's output -> (MatMuls, first transpose, BatchNorm)
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        t1 = producer.get(bn.input[0])
        t2 = next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == bn.output[0]), None)
        if t1 is None or t1.op_type != "Transpose" or t2 is None:
            continue
        perm1 = list(helper.get_attribute_value(next(a for a in t1.attribute if a.name == "perm")))
        perm2 = list(helper.get_attribute_value(next(a for a in t2.attribute if a.name == "perm")))
        rank = len(perm1)
        terms = matmuls(t1.input[0])
        if (
            terms is None
            or rank < 2
            or perm1[1] != rank - 1
            or len(perm2) != rank
            or [perm1[i] for i in perm2] != list(range(rank))
            or not all(name in inits for name in bn.input[1:5])
            or any(readers.get(n.output[0], 0) != 1 for n in (t1, bn))
        ):
            continue
        found[t2.output[0]] = (terms, t1, bn)
    if not found:
        return []
    dropped = {id(n) for _, t1, bn in found.values() for n in (t1, bn)}
    done, nodes = [], []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if not (node.output and node.output[0] in found):
            nodes.append(node)
            continue
        terms, t1, bn = found[node.output[0]]
        scale, shift = _batchnorm_affine(bn, inits)
        p = f"{_label(bn)}_form"
        for j, mm in enumerate(terms):  # each weight read by this MatMul only from here on
            w = numpy_helper.to_array(inits[mm.input[1]]).astype(np.float64) * scale[None, :]
            graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), f"{p}_w{j}"))
            mm.input[1] = f"{p}_w{j}"
        graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), f"{p}_shift"))
        nodes.append(helper.make_node("Add", [t1.input[0], f"{p}_shift"], [node.output[0]], name=f"{p}_shift"))
        names = ", ".join(_label(mm) for mm in terms)
        done.append(f"BatchNormalization {_label(bn)} folded into MatMul{'s' if len(terms) > 1 else ''} {names} ({len(scale)} channels)")
    _set_nodes(model, nodes)
    return done


def _axes(node, inits, helper, numpy_helper) -> list[int] | None:
    """A Reduce* node's constant axes (input in opset 18+, attribute before); None if unknown."""
    if len(node.input) > 1 and node.input[1]:
        return numpy_helper.to_array(inits[node.input[1]]).tolist() if node.input[1] in inits else None
    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"), None)


def hoist_max_over_bias_relu(model) -> list[str]:
    """``ReduceMax(Relu(x + c1 + ...), axes)`` -> ``Relu(ReduceMax(x, axes) + c1 + ...)`` when
    every ``c`` is constant along the reduced axes (size 1 there, or missing).

    The PFN and the last VFE layer of a pillar / voxel encoder add the folded BatchNorm's shift
    (and a VFE layer its per-voxel term, ``split_concat_matmuls``), apply ReLU to every point's
    features and then keep each voxel's maximum over the points. Adding a term that is the same
    for all points and ReLU are both non-decreasing, so they commute with the maximum, and the
    rounding of ``fl(x + c)`` is monotonic in ``x``: the result is bit-identical. The Adds and
    the ReLU then run on one row per voxel instead of one per point (PointPillars nuScenes'
    second VFE layer: three passes over a 6522 x 64 x 64 tensor). Only single-reader chains
    with ``keepdims=1`` are rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers = _reader_counts(graph)

    def along(name: str, axes: list[int], rank: int) -> bool:
        """``name`` broadcasts as a constant along ``axes`` of a rank-``rank`` result."""
        dims = shapes.get(name) if name not in inits else list(inits[name].dims)
        if dims is None or len(dims) > rank:
            return False
        return all(a - (rank - len(dims)) < 0 or dims[a - (rank - len(dims))] == 1 for a in axes)

    found = {}  # id(ReduceMax) -> (x, [c innermost first], relu)
    for node in graph.node:
        if node.op_type != "ReduceMax":
            continue
        relu = producer.get(node.input[0])
        keepdims = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "keepdims"), 1)
        axes = _axes(node, inits, helper, numpy_helper) if relu is not None else None
        rank = len(shapes.get(node.input[0]) or [])
        if relu is None or relu.op_type != "Relu" or readers.get(relu.output[0]) != 1 or not axes or not rank or keepdims != 1:
            continue
        axes = [a % rank for a in axes]
        x, terms = relu.input[0], []
        while True:
            add = producer.get(x)
            if add is None or add.op_type != "Add" or readers.get(x) != 1:
                break
            a, b = add.input
            if along(b, axes, rank) and len(shapes.get(a) or []) == rank:
                x, c = a, b
            elif along(a, axes, rank) and len(shapes.get(b) or []) == rank:
                x, c = b, a
            else:
                break
            terms.append(c)
        if terms:
            found[id(node)] = (x, terms[::-1], relu)
    if not found:
        return []
    done, nodes = [], []
    for node in graph.node:
        if id(node) not in found:
            nodes.append(node)
            continue
        x, terms, relu = found[id(node)]
        p = f"{_label(node)}_form"
        nodes.append(helper.make_node("ReduceMax", [x, *node.input[1:]], [f"{p}_max"], name=f"{p}_max", keepdims=1))
        total = f"{p}_max"
        for j, c in enumerate(terms):
            nodes.append(helper.make_node("Add", [total, c], [f"{p}_add{j}"], name=f"{p}_add{j}"))
            total = f"{p}_add{j}"
        nodes.append(helper.make_node("Relu", [total], [node.output[0]], name=f"{p}_relu"))
        done.append(f"ReduceMax {_label(node)} moved before its ReLU and {len(terms)} Add{'s' if len(terms) > 1 else ''}")
    _set_nodes(model, nodes)
    return done


def select_scatters_as_concats(model) -> list[str]:
    """``ScatterElements(data, Expand(c, Shape(u)), u, axis)`` (``x[..., c] = u``: one whole
    slice written at a constant index) -> ``Concat(data[..., :c], u, data[..., c+1:])``.

    HardVFE builds its voxel-centre offsets as ``f_center[:, :, i] = ...`` for i = 0, 1, 2;
    torch exports each write as a ScatterElements over per-element indices, which
    onnxruntime runs one element at a time on one thread (3.7 ms each on PointPillars
    nuScenes' 6522 x 64 x 3 tensor). The Concat copies the same values. Only a static
    ``data`` extent along ``axis``, ``u`` of extent 1 there, and no reduction qualify. A chain
    of such writes becomes one Concat of the written slices (the Concats before it are dropped
    when nothing else reads them).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    producer = {o: n for n in graph.node for o in n.output}

    def constant(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    built: dict[str, tuple[int, list]] = {}  # a form's output -> (axis, [(part, width), ...])
    done, nodes = [], []
    for node in graph.node:
        if node.op_type != "ScatterElements":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        expand = producer.get(node.input[1])
        data, updates = shapes.get(node.input[0]), shapes.get(node.input[2])
        index = constant(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if index is None or index.size != 1 or not data or not updates or len(data) != len(updates):
            nodes.append(node)
            continue
        axis = attrs.get("axis", 0) % len(data)
        size, c = data[axis], int(index.reshape(()))
        if _scatter_reduction(node) != "none" or size is None or updates[axis] != 1 or not -size <= c < size:
            nodes.append(node)
            continue
        c %= size
        p = f"{_label(node)}_form"
        # the data's parts: a previous form's Concat inputs (x[..., 0] = a; x[..., 1] = b; ...
        # becomes one Concat of a, b, ...), else the whole tensor
        source = node.input[0]
        while source not in built and source in producer and producer[source].op_type == "Identity":
            source = producer[source].input[0]
        parts = built[source][1] if built.get(source, (None,))[0] == axis else [(node.input[0], size)]
        before, after, offset = [], [], 0  # the parts left of index c and right of it
        for name, width in parts:
            for side, start, end in ((before, offset, min(offset + width, c)), (after, max(offset, c + 1), offset + width)):
                if start >= end:
                    continue
                if end - start == width:
                    side.append((name, width))
                    continue
                piece = f"{p}_slice{len(before) + len(after)}"
                for key, value in (("starts", start - offset), ("ends", end - offset), ("axes", axis)):
                    graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{piece}_{key}"))
                nodes.append(helper.make_node("Slice", [name, f"{piece}_starts", f"{piece}_ends", f"{piece}_axes"], [piece], name=piece))
                side.append((piece, end - start))
            offset += width
        kept = before + [(node.input[2], 1)] + after
        nodes.append(helper.make_node("Concat", [name for name, _ in kept], [node.output[0]], axis=axis, name=f"{p}_concat"))
        built[node.output[0]] = (axis, kept)
        done.append(f"ScatterElements {_label(node)} (index {c} of {size} along axis {axis}) as Concat")
    if not done:
        return []
    _set_nodes(model, nodes)
    return done


def _row_reducing_scatters(model, reductions: tuple[str, ...] = ("max", "min")):
    """``(node, rows, reduction, channels, size)`` for every ``ScatterElements(data [M, C], Expand(i
    [N, 1]), u [N, C], axis=0, reduction=...)`` with a reduction in ``reductions``: a whole row per
    update, what ``scatter_reduce(0, i.expand(N, C), u, 'amax')`` (DynamicScatter's max) and
    ``scatter_add(0, i.expand(N, C), u)`` (bev_pool, DynamicScatter's sums) export to. ``rows`` is
    ``i``'s name, ``channels`` the static C, ``size`` M * C when M is static too, else None."""
    from onnx import helper

    graph = model.graph
    shapes = _shapes(graph)
    producer = {o: n for n in graph.node for o in n.output}
    for node in list(graph.node):
        if node.op_type != "ScatterElements":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        reduction = _scatter_reduction(node)
        expand = producer.get(node.input[1])
        data, updates = shapes.get(node.input[0]), shapes.get(node.input[2])
        rows = shapes.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if reduction not in reductions or attrs.get("axis", 0) not in (0, -2) or not rows or rows[1:] != [1]:
            continue
        if not data or not updates or len(data) != 2 or len(updates) != 2 or data[1] is None or updates[1] != data[1]:
            continue
        yield node, expand.input[0], reduction, data[1], (data[0] * data[1] if data[0] is not None else None)


def flatten_row_scatters(model) -> list[str]:
    """A row-wise max / min / add ``ScatterElements`` (``_row_reducing_scatters``) on the
    flattened tensors: ``data`` and ``u`` viewed as 1-D, index ``i * C + c`` (int32 when ``data``
    has a static size below 2**31, which halves the index's memory; else int64).

    onnxruntime runs a reducing ScatterElements sequentially element by element; on 1-D tensors
    its per-element index arithmetic is shorter: PointPillars-DV's DynamicScatter max over 16897
    points x 64 channels 21.8 -> 7.9 ms, BEVFusion's bev_pool sum over 2.0M frustum points x 80
    channels (plus building its index) 8.3 -> ~2 s, both on one thread. The elements are visited in
    the same order (row-major over ``u``), so the sums are the same float additions in the same
    order and the maxima the same: the outputs are bit-identical.
    onnxruntime's reducing ScatterND, which would take whole rows, races with more than one thread
    (microsoft/onnxruntime#18048), so it is not an option here."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    done = []
    for node, rows, reduction, channels, size in list(_row_reducing_scatters(model, ("max", "min", "add"))):
        p = f"{_label(node)}_form_flat"
        narrow = size is not None and size < 2**31
        index_type, index_dtype = (TensorProto.INT32, np.int32) if narrow else (TensorProto.INT64, np.int64)
        graph.initializer.extend([
            numpy_helper.from_array(np.array(channels, index_dtype), f"{p}_channels"),
            numpy_helper.from_array(np.arange(channels, dtype=index_dtype).reshape(1, channels), f"{p}_columns"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}_flat"),
            numpy_helper.from_array(np.array([-1, channels], np.int64), f"{p}_rows"),
        ])  # fmt: skip
        built = [
            helper.make_node("Cast", [rows], [f"{p}_i"], to=index_type, name=f"{p}_i"),
            helper.make_node("Mul", [f"{p}_i", f"{p}_channels"], [f"{p}_first"], name=f"{p}_first"),
            helper.make_node("Add", [f"{p}_first", f"{p}_columns"], [f"{p}_index2d"], name=f"{p}_index2d"),
            helper.make_node("Reshape", [f"{p}_index2d", f"{p}_flat"], [f"{p}_index"], name=f"{p}_index"),
            helper.make_node("Reshape", [node.input[0], f"{p}_flat"], [f"{p}_data"], name=f"{p}_data"),
            helper.make_node("Reshape", [node.input[2], f"{p}_flat"], [f"{p}_updates"], name=f"{p}_updates"),
            helper.make_node("ScatterElements", [f"{p}_data", f"{p}_index", f"{p}_updates"], [f"{p}_out"], name=p,
                             axis=0, reduction=reduction),
            helper.make_node("Reshape", [f"{p}_out", f"{p}_rows"], [node.output[0]], name=f"{p}_back"),
        ]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(built):
            graph.node.insert(at + offset, n)
        done.append(f"ScatterElements {_label(node)} (row-wise {reduction}) on flattened tensors")
    if done:
        remove_dead_nodes(model)
    return done


def row_max_scatters_as_scatter_nd(model) -> list[str]:
    """A max- or min-reducing ``ScatterElements`` -> the equal ``ScatterND(reduction=max|min)``:
    row-wise ones (``_row_reducing_scatters``) with the row indices, 1-D ones (what
    ``flatten_row_scatters`` leaves in model.onnx) with the indices as int64 ``[K, 1]``.

    IREE 3.13's importer cannot legalize a max- or min-reducing ScatterElements but lowers the
    ScatterND to its scatter with a max / min combiner. The same elements get the same maxima
    (max and min are exact in any order). Applied to the IREE copy only: onnxruntime keeps the
    ScatterElements, whose CPU kernel runs sequentially (its reducing ScatterND races,
    microsoft/onnxruntime#18048).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model.CopyFrom(onnx.shape_inference.infer_shapes(model, data_prop=True))  # the forms' new tensors
    graph = model.graph
    done = []
    for node, rows, reduction, _, _ in list(_row_reducing_scatters(model)):
        label = _label(node)
        done.append(f"ScatterElements {label} (row-wise {reduction}) as ScatterND")
        inputs = [node.input[0], rows, node.input[2]]
        node.CopyFrom(helper.make_node("ScatterND", inputs, list(node.output), name=f"{label}_form_nd", reduction=reduction))
    shapes, types = _shapes(graph), _elem_types(graph)
    for node in list(graph.node):
        if node.op_type != "ScatterElements" or (reduction := _scatter_reduction(node)) not in ("max", "min"):
            continue
        if len(shapes.get(node.input[0]) or []) != 1 or len(shapes.get(node.input[1]) or []) != 1:
            continue
        label = _label(node)
        axes = f"{label}_nd_axes"
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
        at = list(graph.node).index(node)
        index = node.input[1]
        if types.get(index) != TensorProto.INT64:  # ScatterND takes int64 indices only
            graph.node.insert(at, helper.make_node("Cast", [index], [f"{label}_nd_i64"], to=TensorProto.INT64, name=f"{label}_nd_i64"))
            index, at = f"{label}_nd_i64", at + 1
        unsqueeze = helper.make_node("Unsqueeze", [index, axes], [f"{label}_nd_index"], name=f"{label}_nd_index")
        inputs = [node.input[0], f"{label}_nd_index", node.input[2]]
        node.CopyFrom(helper.make_node("ScatterND", inputs, list(node.output), name=f"{label}_form_nd", reduction=reduction))
        graph.node.insert(at, unsqueeze)
        done.append(f"ScatterElements {label} (1-D {reduction}) as ScatterND")
    if done:
        remove_dead_nodes(model)
    return done


#: IREE copy: a Softmax or MatMul summing at least this many static f32 terms is split in two levels.
LONG_REDUCTION = 4096


def _sqrt_divisor(n: int) -> int | None:
    """The divisor of ``n`` nearest below sqrt(n), if it is at least 16."""
    for b in range(math.isqrt(n), 15, -1):
        if n % b == 0:
            return b
    return None


def _row_length(norm, shape: list[int], n: int, producers: dict, shapes: dict) -> int | None:
    """The inner part size for an InstanceNormalization's sums of sums: the rows of the image it
    normalises (``W`` of ``[N, C, H, W]``, also through GroupNorm's ``Reshape`` to ``[N, G, -1]``),
    else the divisor nearest sqrt(n). Parts along the rows suit IREE's channels-last layout of the
    neighbouring convolutions: a Conv -> GroupNorm -> ReLU -> Conv chain at a PGD head size ran
    72-81 ms with parts of W = 100 values, 80.7 ms with parts of 200, 68-82 ms unsplit (two
    threads, a noisy machine); PGD 1.18-1.27x onnxruntime against 1.37-1.39x with parts of ~sqrt(n)."""
    source = shape
    producer = producers.get(norm.input[0])
    if len(shape) == 3 and producer is not None and producer.op_type == "Reshape":
        source = _static_shape(shapes, producer.input[0]) or shape
    row = source[-1] if len(source) >= 4 else None
    if row and row >= 16 and n % row == 0 and n // row >= 2:
        return row
    return _sqrt_divisor(n)


def split_long_reductions(model, limit: int = LONG_REDUCTION, fused_attentions: bool = False) -> list[str]:
    """A Softmax over a static last axis of ``n >= limit``, a MatMul whose static ``K >= limit`` and
    an InstanceNormalization over ``n >= limit`` values (GroupNorm's export) as sums of sums:
    ``n = a * b`` with ``b`` the divisor nearest sqrt(n) (for InstanceNormalization the image's
    row length, ``_row_length``), ``b`` terms summed ``a`` times, then those ``a`` partial sums.

    - ``Softmax(x)`` -> ``e = Exp(x - ReduceMax(x))``, ``e / ReduceSum(ReduceSum(Reshape(e, [.., a, b])))``;
    - ``MatMul(A [.., M, K], B [.., K, N])`` -> ``ReduceSum(MatMul(Transpose(A as [.., M, a, b]) ->
      [.., a, M, b], B as [.., a, b, N]), axis=-3)``.

    IREE 3.13 sums both in order into one f32 (the softmax denominator; a data-tiled matmul's
    ``[16, 1]`` tiles run the whole K per output), and BEVFusion's cross-attention over the 32400
    BEV cells lost 2.5e-4 of the softmax row sums and 3.9e-3 of its value matmul, so ``dim`` ended
    1.9e-4 from eager (onnxruntime: 1.5e-5). Two levels of ~180 terms: row sums within 1.8e-6,
    the whole model 1.53e-5, and its decoder ran 44-67 s -> 1.0 s in IREE. Same function, another
    summation order. Applied to the IREE copy only (``codegen.iree.iree_onnx``), after
    ``chunked_long_matmuls``, which takes the MatMuls with static rows and a constant ``B`` first
    where IREE does not data-tile matmuls (sums of at most 1152 terms there).

    - ``InstanceNormalization(x)`` -> the mean and then the mean square of ``x - mean`` (two
      passes), each a sum of sums, then ``x * g + (bias - mean * g)`` with ``g = scale / sqrt(var
      + eps)`` per channel. IREE's own lowering was 17x further from float64 than onnxruntime
      over 245,760 values (1.7e-4 against 1e-5 for data of mean 3, std 2); SMOKE's GroupNorm head
      (8 channels x 96 x 320 a group) ended 6.4e-3 from eager where onnxruntime is 3.7e-4.

    An attention, ``MatMul(Softmax(MatMul(Q [.., M, C], Kt [.., C, K])), V [.., K, N])`` with the
    intermediates read by nothing else, is split as a whole (``_split_attention``): the scores are
    computed as ``[.., a, M, b]`` from ``Kt`` as ``[.., a, C, b]`` (a small transpose), the
    exponentials multiply ``V`` as ``[.., a, b, N]`` unnormalised, and the ``[.., M, N]`` sum is
    divided by the softmax's sum, so the ``M x K`` probabilities are neither normalised nor
    transposed (BEVFusion's cross-attention: 8 x 200 x 32400 floats, 207 MB).

    ``fused_attentions`` (what ``codegen.iree.iree_onnx`` asks for): such an attention is instead
    one fused attention per block of ``b`` keys (``_attention_block``) and the blocks'
    combination (``_fused_attention``). The custom node ``ONLINE_ATTENTION`` takes ``Q``, the keys
    as ``[.., a, b, C]`` and the values as ``[.., a, b, N]``, and returns per block (``[.., a, M,
    N]``, ``[.., a, M, 1]`` twice): the unnormalised weighted sum ``acc = sum exp2(s' - max) v``,
    the block's ``max`` of ``s' = s * log2(e)`` and ``sum = sum exp2(s' - max)`` (IREE's attention
    works in base 2). ``codegen.iree.fuse_online_attentions`` turns it into
    ``iree_linalg_ext.online_attention``: the scores stay in the dispatch's tiles. The blocks then
    combine with ``w = exp((max - max over blocks) * ln 2)``: ``sum(w acc) / sum(w sum)``.
    BEVFusion's cross-attention (8 heads x 200 queries x 32400 BEV cells, 16 channels), one
    thread: the split form (five passes over 207 MB) took 450 ms, the fused form 103 (the fused
    dispatch 99); one fused attention over all 32400 keys 91 ms but 3.7e-3 from float64 on the
    model's own inputs (IREE accumulates all keys in order), against 2.8e-5 with blocks of 144
    (onnxruntime's unsplit chain: 2.3e-4). IREE only: onnxruntime has no such op."""
    import onnx
    from onnx import helper, numpy_helper

    model.CopyFrom(onnx.shape_inference.infer_shapes(model, data_prop=True))
    graph = model.graph
    shapes = _shapes(graph)
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    inits = {init.name: init for init in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    nodes, done = [], []

    def const(name: str, values, dtype=np.int64) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    attention = _attentions(graph, shapes, limit)  # the chains' final MatMul -> (scores, softmax)
    inside = {n.output[0] for chain in attention.values() for n in chain}
    for node in graph.node:
        label = _label(node)
        p = f"{label}_form_split_"
        if node.output[0] in inside:
            continue  # emitted with the chain's last MatMul
        if node.output[0] in attention:
            scores, softmax = attention[node.output[0]]
            n = shapes[softmax.input[0]][-1]
            if fused_attentions:
                nodes += _fused_attention(graph, scores, node, shapes, f"{label}_form_online_", const)
                done.append(f"attention {label} over {n} keys as one fused attention per block of {_attention_block(n)} (IREE's online_attention)")
            else:
                nodes += _split_attention(scores, node, shapes, p, const)
                done.append(f"attention {label} over {n} as parts of {_sqrt_divisor(n)}")
            continue
        if node.op_type == "Softmax":
            shape = _static_shape(shapes, node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if shape and axis in (-1, len(shape) - 1) and shape[-1] >= limit and (b := _sqrt_divisor(shape[-1])):
                n, x, last = shape[-1], node.input[0], const(p + "axis", [-1])
                nodes += [
                    helper.make_node("ReduceMax", [x, last], [p + "max"], keepdims=1, name=p + "max"),
                    helper.make_node("Sub", [x, p + "max"], [p + "shifted"], name=p + "shifted"),
                    helper.make_node("Exp", [p + "shifted"], [p + "exp"], name=p + "exp"),
                    helper.make_node("Reshape", [p + "exp", const(p + "shape", [*shape[:-1], n // b, b])], [p + "parts"], name=p + "parts"),
                    helper.make_node("ReduceSum", [p + "parts", last], [p + "partial"], keepdims=0, name=p + "partial"),
                    helper.make_node("ReduceSum", [p + "partial", last], [p + "sum"], keepdims=1, name=p + "sum"),
                    helper.make_node("Div", [p + "exp", p + "sum"], list(node.output), name=p + "div"),
                ]
                done.append(f"Softmax {label} over {n} as {n // b} sums of {b}")
                continue
        if node.op_type == "InstanceNormalization":
            shape = _static_shape(shapes, node.input[0])
            n = math.prod(shape[2:]) if shape and len(shape) >= 3 else 0
            if n >= limit and (b := _row_length(node, shape, n, producers, shapes)) and all(i in inits for i in node.input[1:3]):
                eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
                channels = shape[1]
                for i, part in ((1, "scale"), (2, "bias")):
                    value = numpy_helper.to_array(inits[node.input[i]]).reshape(channels, 1, 1)
                    graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), p + part))
                for name, value in ((p + "count", n), (p + "eps", eps)):
                    graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
                last, second = const(p + "last", [-1]), const(p + "second", [-2])

                def total(x: str, out: str) -> list:  # [N, C, a, b] -> [N, C, 1, 1]: b terms a times, then the a sums
                    return [
                        helper.make_node("ReduceSum", [x, last], [out + "_partial"], keepdims=1, name=out + "_partial"),
                        helper.make_node("ReduceSum", [out + "_partial", second], [out], keepdims=1, name=out),
                    ]

                nodes += [
                    helper.make_node("Reshape", [node.input[0], const(p + "shape", [*shape[:2], n // b, b])], [p + "x"], name=p + "x"),
                    *total(p + "x", p + "sum"),
                    helper.make_node("Div", [p + "sum", p + "count"], [p + "mean"], name=p + "mean"),
                    helper.make_node("Sub", [p + "x", p + "mean"], [p + "centred"], name=p + "centred"),
                    helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squares"], name=p + "squares"),
                    *total(p + "squares", p + "sum_squares"),
                    helper.make_node("Div", [p + "sum_squares", p + "count"], [p + "var"], name=p + "var"),
                    helper.make_node("Add", [p + "var", p + "eps"], [p + "var_eps"], name=p + "var_eps"),
                    helper.make_node("Sqrt", [p + "var_eps"], [p + "std"], name=p + "std"),
                    # per channel: y = x * (scale / std) + (bias - mean * scale / std), so that x is
                    # read once more and the centred copy is not kept for the output
                    helper.make_node("Div", [p + "scale", p + "std"], [p + "gain"], name=p + "gain"),
                    helper.make_node("Mul", [p + "mean", p + "gain"], [p + "mean_gain"], name=p + "mean_gain"),
                    helper.make_node("Sub", [p + "bias", p + "mean_gain"], [p + "offset"], name=p + "offset"),
                    helper.make_node("Mul", [p + "x", p + "gain"], [p + "scaled"], name=p + "scaled"),
                    helper.make_node("Add", [p + "scaled", p + "offset"], [p + "shifted"], name=p + "shifted"),
                    helper.make_node("Reshape", [p + "shifted", const(p + "out_shape", shape)], list(node.output), name=p + "out"),
                ]
                done.append(f"InstanceNormalization {label} over {n} as {n // b} sums of {b} (two passes)")
                continue
        if node.op_type == "MatMul":
            sa, sb = _static_shape(shapes, node.input[0]), _static_shape(shapes, node.input[1])
            if sa and sb and len(sa) >= 2 and len(sb) >= 2 and sa[-1] >= limit and (b := _sqrt_divisor(sa[-1])):
                k, rank = sa[-1], len(sa) + 1
                a = k // b
                nodes += [
                    helper.make_node("Reshape", [node.input[0], const(p + "a_shape", [*sa[:-1], a, b])], [p + "a"], name=p + "a"),
                    helper.make_node("Transpose", [p + "a"], [p + "a_t"], perm=[*range(rank - 3), rank - 2, rank - 3, rank - 1], name=p + "a_t"),
                    helper.make_node("Reshape", [node.input[1], const(p + "b_shape", [*sb[:-2], a, b, sb[-1]])], [p + "b"], name=p + "b"),
                    helper.make_node("MatMul", [p + "a_t", p + "b"], [p + "partial"], name=p + "partial"),  # [.., a, M, N]
                    helper.make_node("ReduceSum", [p + "partial", const(p + "axis", [-3])], list(node.output), keepdims=0, name=p + "sum"),
                ]
                done.append(f"MatMul {label} K={k} as {a} partial products of {b}")
                continue
        nodes.append(node)
    if fused_attentions and attention and not any(o.domain == ONLINE_ATTENTION[0] for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ONLINE_ATTENTION[0], 1))
    if done:
        _set_nodes(model, nodes, prune=False)
    return done


def _attentions(graph, shapes: dict, limit: int) -> dict:
    """``final MatMul's output -> (scores MatMul, Softmax)`` of each ``MatMul(Softmax(MatMul(Q, Kt)),
    V)`` over a static last axis ``K >= limit`` (split by ``_sqrt_divisor``) whose scores and
    probabilities are read only by the next node of the chain; equal batch dims."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    found = {}
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or next((a.i for a in softmax.attribute if a.name == "axis"), -1) != -1:
            continue
        scores = producer.get(softmax.input[0])
        after = readers.get(softmax.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(after) != 1 or after[0].op_type != "MatMul":
            continue
        final = after[0]
        if final.input[0] != softmax.output[0] or len(readers.get(scores.output[0], [])) != 1:
            continue
        if {scores.output[0], softmax.output[0]} & outputs:
            continue
        q, kt, v = (_static_shape(shapes, name) for name in (scores.input[0], scores.input[1], final.input[1]))
        if not (q and kt and v and len(q) == len(kt) == len(v) >= 3 and q[:-2] == kt[:-2] == v[:-2]):
            continue
        if kt[-1] >= limit and _sqrt_divisor(kt[-1]) and v[-2] == kt[-1] and q[-1] == kt[-2]:
            found[final.output[0]] = (scores, softmax)
    return found


def _split_attention(scores, final, shapes: dict, p: str, const) -> list:
    """The nodes of ``split_long_reductions``' attention form (names prefixed ``p``)."""
    from onnx import helper

    q, kt, v = (shapes[name] for name in (scores.input[0], scores.input[1], final.input[1]))
    k = kt[-1]
    b = _sqrt_divisor(k)
    a, rank = k // b, len(kt) + 1
    batch = list(range(rank - 3))
    make = helper.make_node
    return [
        make("Reshape", [scores.input[1], const(p + "kt_shape", [*kt[:-1], a, b])], [p + "kt"], name=p + "kt"),
        make("Transpose", [p + "kt"], [p + "kt_t"], perm=[*batch, rank - 2, rank - 3, rank - 1], name=p + "kt_t"),
        make("Unsqueeze", [scores.input[0], const(p + "q_axis", [-3])], [p + "q"], name=p + "q"),
        make("MatMul", [p + "q", p + "kt_t"], [p + "scores"], name=p + "scores"),  # [.., a, M, b]
        make("ReduceMax", [p + "scores", const(p + "both", [-3, -1])], [p + "max"], keepdims=1, name=p + "max"),
        make("Sub", [p + "scores", p + "max"], [p + "shifted"], name=p + "shifted"),
        make("Exp", [p + "shifted"], [p + "exp"], name=p + "exp"),
        make("ReduceSum", [p + "exp", const(p + "last", [-1])], [p + "partial"], keepdims=1, name=p + "partial"),
        make("ReduceSum", [p + "partial", const(p + "parts", [-3])], [p + "sum"], keepdims=0, name=p + "sum"),
        make("Reshape", [final.input[1], const(p + "v_shape", [*v[:-2], a, b, v[-1]])], [p + "v"], name=p + "v"),
        make("MatMul", [p + "exp", p + "v"], [p + "products"], name=p + "products"),  # [.., a, M, N]
        make("ReduceSum", [p + "products", const(p + "parts_v", [-3])], [p + "weighted"], keepdims=0, name=p + "weighted"),
        make("Div", [p + "weighted", p + "sum"], list(final.output), name=p + "div"),
    ]


#: the custom op of ``split_long_reductions``' fused attentions; ``codegen.iree.fuse_online_attentions`` replaces it
#: in the imported MLIR by IREE's ``iree_linalg_ext.online_attention`` (iree-import-onnx drops the
#: domain: the op imports as ``torch.operator "onnx.OnlineAttention"``)
ONLINE_ATTENTION = ("mmdet3d_export", "OnlineAttention")


def _attention_block(k: int) -> int | None:
    """Keys per block of ``split_long_reductions``' fused attentions: the divisor of ``k`` nearest sqrt(k) that is a
    multiple of 16 (IREE's attention tiles the keys by 16: 32400 keys in blocks of 144 ran in 93.7
    ms, in blocks of 180 in 117 ms, one thread), else ``_sqrt_divisor``."""
    blocks = [b for b in range(16, k + 1, 16) if k % b == 0 and b * b <= 4 * k and 4 * b * b >= k]
    return min(blocks, key=lambda b: abs(b * b - k)) if blocks else _sqrt_divisor(k)


def _fused_attention(graph, scores, final, shapes: dict, p: str, const) -> list:
    """The nodes of ``split_long_reductions``' fused attention form (names prefixed ``p``): the
    custom node ``ONLINE_ATTENTION`` per block of keys and the blocks' combination; declares the
    custom node's outputs in ``graph.value_info`` (shape inference knows nothing of it)."""
    from onnx import TensorProto, helper

    q, kt, v = (shapes[name] for name in (scores.input[0], scores.input[1], final.input[1]))
    k, n = kt[-1], v[-1]
    b = _attention_block(k)
    a, rank = k // b, len(kt) + 1
    batch = list(range(rank - 3))
    for part, width in (("acc", n), ("max", 1), ("sum", 1)):
        graph.value_info.append(helper.make_tensor_value_info(p + part, TensorProto.FLOAT, [*q[:-2], a, q[-2], width]))
    make = helper.make_node
    return [
        make("Reshape", [scores.input[1], const(p + "kt_shape", [*kt[:-1], a, b])], [p + "kt"], name=p + "kt"),
        make("Transpose", [p + "kt"], [p + "k"], perm=[*batch, rank - 2, rank - 1, rank - 3], name=p + "k"),  # [.., a, b, C]
        make("Reshape", [final.input[1], const(p + "v_shape", [*v[:-2], a, b, n])], [p + "v"], name=p + "v"),
        make(ONLINE_ATTENTION[1], [scores.input[0], p + "k", p + "v"], [p + "acc", p + "max", p + "sum"], name=p + "fused", domain=ONLINE_ATTENTION[0]),
        make("ReduceMax", [p + "max", const(p + "blocks", [-3])], [p + "top"], keepdims=1, name=p + "top"),
        make("Sub", [p + "max", p + "top"], [p + "below"], name=p + "below"),
        make("Mul", [p + "below", const(p + "ln2", np.float32(math.log(2)), np.float32)], [p + "exponent"], name=p + "exponent"),
        make("Exp", [p + "exponent"], [p + "w"], name=p + "w"),
        make("Mul", [p + "acc", p + "w"], [p + "acc_w"], name=p + "acc_w"),
        make("ReduceSum", [p + "acc_w", p + "blocks"], [p + "num"], keepdims=0, name=p + "num"),
        make("Mul", [p + "sum", p + "w"], [p + "sum_w"], name=p + "sum_w"),
        make("ReduceSum", [p + "sum_w", p + "blocks"], [p + "den"], keepdims=0, name=p + "den"),
        make("Div", [p + "num", p + "den"], list(final.output), name=p + "div"),
    ]


#: ops a MatMul's first operand may pass through from its Gathers and still count as gathered rows
#: (the deformable convolutions' bilinear sums of gathered rows, reshaped to ``[pixels, K]``)
_GATHERED_ROW_PATH = {"Identity", "Reshape", "Transpose", "Mul", "Add"}


def gathered_row_matmuls(onnx_model, min_k: int) -> tuple[int, int]:
    """MatMuls of an ONNX model (a ModelProto or a file) over gathered rows with a static ``K >=
    min_k`` (the shapes its value_info records: ``codegen.iree.iree_onnx`` infers them), as ``(dynamic, sampled)``
    counts: a first operand with a dynamic row count (the sparse convolutions' gathered rows), or
    one built from row Gathers through reshapes, sums and products only (``_GATHERED_ROW_PATH``:
    the deformable convolutions' samples, ``ops.deform_conv``)."""
    import onnx

    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model), load_external_data=False)
    graph = model.graph
    shapes = _shapes(graph)
    producer = {out: node for node in graph.node for out in node.output}

    def from_gathers(name: str, depth: int = 8) -> bool:
        node = producer.get(name)
        if node is None or depth == 0:
            return False
        if node.op_type in ("Gather", "GatherND"):
            return True
        return node.op_type in _GATHERED_ROW_PATH and any(from_gathers(i, depth - 1) for i in node.input[:2])

    dynamic = sampled = 0
    for node in graph.node:
        dims = shapes.get(node.input[0]) if node.op_type == "MatMul" else None
        if not dims or len(dims) < 2 or (dims[-1] or 0) < min_k:
            continue
        if None in dims[:-1]:
            dynamic += 1
        elif from_gathers(node.input[0]):
            sampled += 1
    return dynamic, sampled


def drop_empty_concat_inputs(model) -> list[str]:
    """Drop Concat inputs that are ``Gather(x, [])`` with a constant empty index list.

    Unoptimised exports of large graphs (the ONNX optimiser is skipped past
    ``export.OPTIMIZE_MAX_NODES``) keep shape arithmetic such as ``Concat(Gather(Shape(x), []),
    ...)``; IREE's importer rejects the empty ``Constant`` (``value_ints = []``). An empty
    input adds nothing to a Concat.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    empty = {t.name for t in graph.initializer if 0 in t.dims}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if node.attribute[0].name.endswith("_ints") and len(value) == 0:
                empty.add(node.output[0])
            elif node.attribute[0].name == "value" and numpy_helper.to_array(value).size == 0:
                empty.add(node.output[0])
    gathered = {n.output[0] for n in graph.node if n.op_type == "Gather" and n.input[1] in empty}
    dropped = 0
    for node in graph.node:
        if node.op_type == "Concat" and any(i in gathered for i in node.input):
            kept = [i for i in node.input if i not in gathered]
            if kept:
                dropped += len(node.input) - len(kept)
                del node.input[:]
                node.input.extend(kept)
    if not dropped:
        return []
    remove_dead_nodes(model)
    return [f"{dropped} empty Gather(..., []) inputs dropped from Concats"]


def list_constants_as_initializers(model) -> list[str]:
    """``Constant(value_ints=[...])`` (and ``value_int(s)``/``value_float(s)``) -> initializers.

    IREE's ONNX importer converts ops whose constant operands come from a tensor-valued Constant
    or an initializer, but not from the list-valued attribute form: ``Unsqueeze(x,
    Constant(value_ints=[-1]))`` in an unoptimised export fails to legalize. Same values.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    kinds = {"value_ints": np.int64, "value_int": np.int64, "value_floats": np.float32, "value_float": np.float32}
    nodes, moved = [], 0
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is None or attr.name not in kinds:
            nodes.append(node)
            continue
        value = np.array(helper.get_attribute_value(attr), kinds[attr.name])
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if not moved:
        return []
    _set_nodes(model, nodes, prune=False)
    return [f"{moved} list-valued Constants as initializers"]


def strided_pointwise_convs_as_slices(model) -> list[str]:
    """A 1x1 ``Conv`` with strides > 1 (no padding, no dilation) -> ``Slice(x, steps=strides)``
    and the same Conv with stride 1: the same products and sums of the same pixels. The Slice is
    taken channels-last, between transposes that cancel against the NHWC convolutions'
    (``iree-preprocessing-convert-conv-to-channels-last``); an NCHW Slice made the producing
    convolution write a transposed NCHW copy too, over IREE's 32 KB stack limit.

    IREE 3.13 lowers the strided 1x1 convolution (the downsampling of ResNet stages, and the
    caffe-style blocks' first conv) to a generic reduction, not a matmul: PGD's ResNet-101 spent
    4.4 of its 20.7 s (one thread) in six such dispatches at ~5 GFLOP/s, against ~80 for the
    stride-1 1x1 convs. Applied to the IREE copy only (``codegen.iree.iree_onnx``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    done, slices = [], {}
    for node in list(graph.node):
        if node.op_type != "Conv":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        strides = list(attrs.get("strides", []))
        kernel = list(attrs.get("kernel_shape", []))
        pads, dilations = list(attrs.get("pads", [])), list(attrs.get("dilations", []))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if (
            len(strides) != 2 or all(s == 1 for s in strides) or kernel != [1, 1]
            or any(pads) or any(d != 1 for d in dilations) or auto_pad not in (b"NOTSET", "NOTSET")
        ):
            continue
        label = _label(node)
        key = (node.input[0], tuple(strides))
        if key not in slices:  # one Slice per input and strides (a ResNet block's conv1 and downsample)
            consts = {"starts": [0, 0], "ends": [np.iinfo(np.int64).max] * 2, "axes": [1, 2], "steps": strides}
            names = []
            for part, values in consts.items():
                names.append(f"{label}_form_slice_{part}")
                graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), names[-1]))
            p = f"{label}_form_slice"
            slices[key] = p
            at = min(i for i, n in enumerate(graph.node) if key[0] in n.input)
            for offset, new in enumerate([
                helper.make_node("Transpose", [key[0]], [f"{p}_nhwc"], perm=[0, 2, 3, 1], name=f"{p}_nhwc"),
                helper.make_node("Slice", [f"{p}_nhwc", *names], [f"{p}_nhwc_sliced"], name=f"{p}_nhwc_sliced"),
                helper.make_node("Transpose", [f"{p}_nhwc_sliced"], [p], perm=[0, 3, 1, 2], name=p),
            ]):
                graph.node.insert(at + offset, new)
        node.input[0] = slices[key]
        for a in node.attribute:
            if a.name == "strides":
                del a.ints[:]
                a.ints.extend([1, 1])
        done.append(f"Conv {label} (1x1, strides {strides}) as Slice + Conv")
    return done


#: ``pointwise_convs_as_matmuls`` leaves 1x1 convolutions over this many input floats or more alone
#: (SMOKE's 64 x 30720 gained, BEVFusion's 128 x 32400 lost)
POINTWISE_MATMUL_MAX = 1 << 21


def _rows_read_channels_first(x: str, producers: dict, readers: dict[str, int], inits: dict, shapes: dict, p: str):
    """``x = Relu(BatchNormalization(Reshape(Transpose(Reshape(y, [1, hw, c]), [0, 2, 1]), [1, c,
    h, w])))``, each step read once (``_reader_counts``: not a graph output) and the BatchNorm's
    parameters constant -> (nodes computing ``Relu(y * s + t)`` as ``[hw, c]`` rows named ``p +
    "_rows"``, the new initializers), else None: a channels-last product (PGD's DCNs') through a
    BatchNorm and ReLU, which IREE would otherwise transpose for the pointwise product that reads
    it as rows (``pointwise_convs_as_matmuls``)."""
    from onnx import helper, numpy_helper

    chain, name = [], x
    for op in ("Relu", "BatchNormalization", "Reshape", "Transpose", "Reshape"):
        node = producers.get(name)
        if node is None or node.op_type != op or readers.get(node.output[0], 0) != 1:
            return None
        chain.append(node)
        name = node.input[0]
    relu, bn, to_4d, transpose, to_3d = chain
    _, c, h, w = shapes.get(to_4d.output[0]) or (None,) * 4
    if _perm(transpose) != [0, 2, 1] or shapes.get(to_3d.output[0]) != [1, h * w, c] or not all(i in inits for i in bn.input[1:5]):
        return None
    scale, shift = _batchnorm_affine(bn, inits)
    consts = [numpy_helper.from_array(scale.astype(np.float32), p + "_bn_scale"),
              numpy_helper.from_array(shift.astype(np.float32), p + "_bn_shift"),
              numpy_helper.from_array(np.array([-1, scale.size], np.int64), p + "_rows_shape")]  # fmt: skip
    nodes = [
        helper.make_node("Reshape", [to_3d.input[0], p + "_rows_shape"], [p + "_rows_y"], name=p + "_rows_y"),
        helper.make_node("Mul", [p + "_rows_y", p + "_bn_scale"], [p + "_rows_scaled"], name=p + "_rows_scaled"),
        helper.make_node("Add", [p + "_rows_scaled", p + "_bn_shift"], [p + "_rows_bn"], name=p + "_rows_bn"),
        helper.make_node("Relu", [p + "_rows_bn"], [p + "_rows"], name=p + "_rows"),
    ]
    return nodes, consts


def pointwise_convs_as_matmuls(model) -> list[str]:
    """A stride-1 1x1 ``Conv`` without padding (``_plain_conv``) on a ``[1, c, h, w]`` input ->
    ``Reshape(Transpose(MatMul(Transpose(Reshape(x, [c, h * w])), W [c, cout]) + b), [1, cout, h,
    w])``: the same products, channels-last (rows are pixels), between Transposes IREE folds into
    the neighbouring channels-last dispatches.

    For IREE when it does not data-tile matmuls (graphs with gathered-row products,
    ``codegen.iree.GATHERED_ROWS_MIN_K``): it lowered SMOKE's 1x1 convolutions (the DLA roots over
    their concatenated inputs, the head's) to channel-major ``matmul_like`` dispatches at ~20
    GFLOP/s on one Xeon thread, where a named matmul runs at ~90: their products went 177 -> 49 ms
    a frame, the whole call 1678 -> 1509 ms of dispatches (same outputs). Channels-first
    (``MatMul(W [cout, c], x [c, h * w])``, the form until 2026-12-07) PGD's 22 ``256 -> 1024``
    convolutions after its DCNs wrote their results transposed for the channels-last residual
    sums: 79 ms each (38 GFLOP/s); channels-last 43 ms, the frame 11.7 -> 10.5 s on one thread,
    5949 -> 5635 ms on two (SMOKE unchanged: 895 / 896 ms). Not for inputs of
    ``POINTWISE_MATMUL_MAX`` floats or more: BEVFusion's 128 x 32400 ran 25.4 -> 60.5 ms
    channels-first. Applied to the IREE copy only (``codegen.iree.iree_onnx``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, shapes, pairs = _plain_convs(graph)
    producers = {out: n for n in graph.node for out in n.output}
    readers = _reader_counts(graph)  # a graph output counts as a reader: its chain stays whole
    done, nodes = [], []
    for node, conv in pairs:
        if not (
            conv and conv.kernel == (1, 1) and conv.strides == (1, 1) and not any(conv.pads) and conv.input[0] == 1
            and math.prod(conv.input) < POINTWISE_MATMUL_MAX
        ):
            nodes.append(node)
            continue
        _, c, h, w = conv.input
        weight = numpy_helper.to_array(inits[node.input[1]])
        p = f"{_label(node)}_form_pointwise"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        consts = {"_w": np.ascontiguousarray(weight.reshape(conv.cout, c).T), "_in_shape": np.array([c, h * w], np.int64),
                  "_out_shape": np.array([1, conv.cout, h, w], np.int64)}  # fmt: skip
        graph.initializer.extend(numpy_helper.from_array(v, p + k) for k, v in consts.items())
        product = p + ("_product" if bias else "_sum")
        on_rows = _rows_read_channels_first(node.input[0], producers, readers, inits, shapes, p)
        if on_rows:  # the producer's rows, its BatchNorm and ReLU taken on them
            nodes += on_rows[0]
            graph.initializer.extend(on_rows[1])
        else:
            nodes += [
                helper.make_node("Reshape", [node.input[0], p + "_in_shape"], [p + "_x"], name=p + "_x"),
                helper.make_node("Transpose", [p + "_x"], [p + "_rows"], perm=[1, 0], name=p + "_rows"),
            ]
        nodes.append(helper.make_node("MatMul", [p + "_rows", p + "_w"], [product], name=product))
        if bias:  # a constant or computed [cout] bias, along the rows
            nodes.append(helper.make_node("Add", [product, bias], [p + "_sum"], name=p + "_sum"))
        nodes += [
            helper.make_node("Transpose", [p + "_sum"], [p + "_channels"], perm=[1, 0], name=p + "_channels"),
            helper.make_node("Reshape", [p + "_channels", p + "_out_shape"], list(node.output), name=p + "_out"),
        ]
        note = " (its input's BatchNorm and ReLU on the producer's rows)" if on_rows else ""
        done.append(f"Conv {_label(node)} (1x1, {c} -> {conv.cout} channels) as MatMul(x, W) channels-last{note}")
    if done:
        _set_nodes(model, nodes)  # the replaced weights
    return done


#: ``chunked_long_matmuls``: the longest K a static MatMul keeps; K x N a chunk keeps at most where
#: N is a power of two (B's rows a power-of-two stride apart); the fewest rows it takes; the row
#: multiple its chunks are padded to (IREE's 8-row vector tiles)
MATMUL_K_CHUNK = 1152
MATMUL_CHUNK_FLOATS = 1152 * 256
CHUNKED_MATMUL_MIN_ROWS = 256
CHUNKED_MATMUL_ROW_MULTIPLE = 8


def chunked_long_matmuls(model, limit: int = MATMUL_K_CHUNK) -> list[str]:
    """A ``MatMul(A, B)`` with a static ``A [.., M, K]`` (at least ``CHUNKED_MATMUL_MIN_ROWS`` rows)
    and a constant 2-D ``B [K, N]`` (an initializer, or computed from constants only: the
    deformable convolutions' ``Gather`` of their regrouped weight) -> the sum, added in order, of
    the ``MatMul`` s of ``A``'s and ``B``'s ``Slice`` s over the fewest equal K chunks of at most
    ``limit`` and, where ``N`` is a power of two, ``MATMUL_CHUNK_FLOATS / N`` (where ``K`` is
    longer): the same products, each output a sum of chunk sums. A 2-D ``A`` whose rows are not a
    multiple of ``CHUNKED_MATMUL_ROW_MULTIPLE`` is padded with zero rows first, and the sum's extra
    rows sliced off.

    For IREE when it does not data-tile matmuls (``codegen.iree.GATHERED_ROWS_MIN_K``): IREE 3.13
    gives a plain matmul 40 x 64 output tiles a workgroup over the whole K, reading a 64-column
    panel of ``B`` for each 40 rows, and once a panel whose rows are a power-of-two stride apart
    no longer stays in cache it runs at ~40 GFLOP/s instead of 85-97 (one thread of the AVX-512
    Xeon, 2 MiB L2): PGD's DCN products ``[5800, 2304] x [2304, 256]`` 166 ms (data-tiled 168 ms),
    as 2, 3 or 4 chunks 74, 71, 69 ms (6 chunks 89 ms); ``[1456, 1152] x [1152, 512]`` 41-42 ms,
    ``[1456, 576] x [576, 512]`` 9.7-9.9 ms; ``[1456, 576] x [576, 1024]`` 42-43 ms, ``[1456, 288]
    x [288, 1024]`` 8.8 ms; ``[1456, 512] x [512, 2048]`` 79 ms, as 4 chunks 41 ms. Other widths
    keep their speed: ``[1456, 1152] x [1152, 768]`` 94 GFLOP/s, and BEVFusion's Swin shapes lose
    in chunks (``[11264, 384] x [384, 1152]`` 120 ms, as 2 chunks 137 ms; ``[11264, 384] x [384,
    1536]`` 216 / 225 ms; ``[1056, 768] x [768, 3072]`` 78 / 82 ms). Row counts that are not a
    multiple of 8 get narrower vector tiles: ``[1450, 576] x [576, 512]`` 15.8 ms. In PGD (two
    threads) the stage-4 DCN products (K = 4608, until 2026-12-07 ``split_long_reductions``') and
    1x1 convolutions to 2048 channels in chunks: 6235 -> 5707 ms with the channels-last
    ``pointwise_convs_as_matmuls``. Dynamic row counts (the sparse convolutions', configured
    apart: ``codegen.iree.VECTOR_PEELING``) are left alone. Applied to the IREE copy only
    (``codegen.iree.iree_onnx``)."""
    import onnx
    from onnx import helper, numpy_helper

    model.CopyFrom(onnx.shape_inference.infer_shapes(model))  # the forms' own tensors (pointwise_convs_as_matmuls')
    graph = model.graph
    shapes = _shapes(graph)
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # in graph order: a node of constants only computes a constant
        if node.op_type == "Constant" or (node.input and all(not i or i in constant for i in node.input)):
            constant.update(node.output)
    done, nodes = [], []
    for node in graph.node:
        a, b = node.input[:2] if node.op_type == "MatMul" else (None, None)
        dims, weight = shapes.get(a), shapes.get(b)
        if (
            not dims or len(dims) < 2 or None in dims or b not in constant or not weight or len(weight) != 2
            or dims[-1] != weight[0] or math.prod(dims[:-1]) < CHUNKED_MATMUL_MIN_ROWS
        ):
            nodes.append(node)
            continue
        k, n = weight
        chunk = min(limit, max(1, MATMUL_CHUNK_FLOATS // n)) if n & (n - 1) == 0 else limit
        if k <= chunk:
            nodes.append(node)
            continue
        chunks = -(-k // chunk)
        bounds = [k * i // chunks for i in range(chunks + 1)]
        p = f"{_label(node)}_form_chunks"
        consts = {"_a_axis": [len(dims) - 1], "_b_axis": [0]}
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            consts.update({f"_lo{i}": [lo], f"_hi{i}": [hi]})
        rows, pad = dims[0], -dims[0] % CHUNKED_MATMUL_ROW_MULTIPLE if len(dims) == 2 else 0
        if pad:
            consts.update({"_pads": [0, 0, pad, 0], "_rows": [rows], "_zero": [0]})
        graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), p + name) for name, v in consts.items())
        if pad:
            nodes.append(helper.make_node("Pad", [a, p + "_pads"], [p + "_padded"], name=p + "_padded"))
            a = p + "_padded"
        total, out = None, (p + "_sum" if pad else node.output[0])
        for i in range(chunks):
            product = f"{p}_product{i}"
            nodes += [
                helper.make_node("Slice", [x, f"{p}_lo{i}", f"{p}_hi{i}", f"{p}_{x_}_axis"], [f"{p}_{x_}{i}"], name=f"{p}_{x_}{i}")
                for x, x_ in ((a, "a"), (b, "b"))
            ]
            nodes.append(helper.make_node("MatMul", [f"{p}_a{i}", f"{p}_b{i}"], [product], name=product))
            if total is not None:
                last = out if i == chunks - 1 else f"{p}_sum{i}"
                nodes.append(helper.make_node("Add", [total, product], [last], name=f"{p}_sum{i}"))
                product = last
            total = product
        if pad:
            nodes.append(helper.make_node("Slice", [out, p + "_zero", p + "_rows", p + "_zero"], list(node.output), name=p + "_rows"))
        sizes = sorted({hi - lo for lo, hi in zip(bounds, bounds[1:])})
        padded = f", {rows} rows padded to {rows + pad}" if pad else ""
        done.append(f"MatMul {_label(node)} (K = {k}, N = {n}) as {chunks} MatMuls over K chunks of {'-'.join(map(str, sizes))}{padded}")
    if done:
        _set_nodes(model, nodes)
    return done


def row_max_pools_as_reductions(model) -> list[str]:
    """A ``MaxPool`` over windows of one row (kernel and strides ``[1, k]``, no padding, dilation
    or ceil mode; static ``N, C, H``) -> ``Slice`` of the whole windows' columns, ``Reshape`` to ``[N, C, H, W / k,
    k]`` and ``ReduceMax`` over the last axis: the maxima of the same values.

    IREE 3.13 runs the pool as a data-tiled convolution, an encode and a pooling dispatch: 20 us
    on a row of 20256 values against 3 for the reduction, one thread.  The first level of
    ``ops.points.furthest_point_sample``'s argmax is such a pool in every step (VoteNet: 2048
    steps over 20000 points).  Applied to the IREE copy only (``codegen.iree.iree_onnx``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes = _shapes(graph)
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if node.op_type == "MaxPool" else {}
        kernel = list(attrs.get("kernel_shape", []))
        if (
            node.op_type != "MaxPool" or len(node.output) != 1 or len(kernel) != 2 or kernel[0] != 1
            or list(attrs.get("strides", [1, 1])) != kernel or any(attrs.get("pads", []))
            or any(d != 1 for d in attrs.get("dilations", [])) or attrs.get("ceil_mode", 0)
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            nodes.append(node)
            continue
        dims = shapes.get(node.input[0]) or [None] * 4
        if len(dims) != 4 or not all(dims[:3]):  # N, C, H static: IREE's importer then types the Reshape
            nodes.append(node)
            continue
        k, p, width = kernel[1], f"{_label(node)}_form", dims[3]
        consts = {"starts": [0], "axes": [3], "shape": [*dims[:3], -1, k], "reduce": [4]}
        if width:
            consts["ends"] = [width // k * k]
        else:
            consts |= {"dim": [3], "k": [k]}
        for key, values in consts.items():
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), f"{p}_{key}"))
        if not width:  # the whole windows' end from the input's shape
            nodes += [
                helper.make_node("Shape", [node.input[0]], [f"{p}_shape_of"], name=f"{p}_shape_of"),
                helper.make_node("Gather", [f"{p}_shape_of", f"{p}_dim"], [f"{p}_width"], name=f"{p}_width"),
                helper.make_node("Div", [f"{p}_width", f"{p}_k"], [f"{p}_windows"], name=f"{p}_windows"),
                helper.make_node("Mul", [f"{p}_windows", f"{p}_k"], [f"{p}_ends"], name=f"{p}_ends"),
            ]
        nodes += [
            helper.make_node("Slice", [node.input[0], f"{p}_starts", f"{p}_ends", f"{p}_axes"], [f"{p}_whole"], name=f"{p}_whole"),
            helper.make_node("Reshape", [f"{p}_whole", f"{p}_shape"], [f"{p}_windows5d"], name=f"{p}_windows5d"),
            helper.make_node("ReduceMax", [f"{p}_windows5d", f"{p}_reduce"], list(node.output), name=p, keepdims=0),
        ]
        count += 1
    if not count:
        return []
    _set_nodes(model, nodes, prune=False)
    return [f"{count} MaxPool(s) over windows of one row as Slice + Reshape + ReduceMax"]


# single-input ops a channels-last result can take before a Transpose to channels-first instead of
# after it (``channels_last_concats``)
_UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Identity"}
NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _perm(node) -> list[int]:
    """A ``Transpose``'s ``perm`` attribute (``[]`` when absent: the reversed axes)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def channels_last_concats(model) -> list[str]:
    """A channel ``Concat`` (axis 1, 4-D) with an input that is a ``Transpose`` from channels-last
    (``NCHW``), through single-reader unary ops (a ReLU), -> the unary ops on the channels-last
    tensors, one ``Concat`` over their last axis and one ``Transpose`` of it; then
    ``cancel_transpose_pairs`` drops what a channels-last reader transposes back (the Winograd
    form's input). The SECFPN necks' deconvolutions end channels-last (``rewrite_deconvs``) and
    their concatenation feeds the heads' 3x3 convolutions, which IREE runs channels-last.

    A channels-first branch (CenterPoint's and BEVFusion's strided Conv beside a deconvolution)
    gets a ``Transpose`` to channels-last, which cancels against the one IREE puts after that
    convolution; a Concat with no channels-last branch stays.

    Before, IREE transposed each branch to NCHW (fused with its pixel shuffle), copied them into
    the NCHW concatenation and transposed the whole of it back (SSN: 15 + 10 ms of branch
    transposes and 19 ms for the 384 x 40000 one, one Xeon thread). Interleaved calls, two
    threads: SSN 510.0 -> 497.6 ms, CenterPoint voxel 884.8 -> 852.4 ms, BEVFusion lidar 1711.9
    -> 1677.4 ms, CenterPoint pillar 405.3 -> 407.1 ms. Applied to the IREE copy only
    (``codegen.iree.iree_onnx``)."""
    from onnx import helper

    graph = model.graph
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    shapes = _shapes(graph)

    def single(name: str) -> bool:
        return name not in outputs and len(readers.get(name, [])) == 1

    def channels_last_source(name: str):
        """(the channels-last tensor, the unary ops from it to ``name`` in order) or None."""
        chain = []
        while name in producer and producer[name].op_type in _UNARY and single(name):
            chain.append(producer[name])
            name = producer[name].input[0]
        node = producer.get(name)
        if node is None or node.op_type != "Transpose" or _perm(node) != NCHW or not single(name):
            return None
        return node.input[0], chain[::-1]

    replace: dict[str, list] = {}
    done = []
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        dims = shapes.get(node.output[0]) or []
        if node.op_type != "Concat" or len(dims) != 4 or axis not in (1, -3):
            continue
        sources = [channels_last_source(x) for x in node.input]
        if not any(sources):
            continue
        p = f"{_label(node)}_form_nhwc"
        new, parts = [], []
        for i, (x, source) in enumerate(zip(node.input, sources)):
            if source is None:  # a channels-first branch (a Conv's): IREE's own transposes cancel this one
                parts.append(f"{p}{i}")
                new.append(helper.make_node("Transpose", [x], [parts[-1]], perm=NHWC, name=parts[-1]))
                continue
            x, chain = source
            for j, op in enumerate(chain):
                out = f"{p}{i}_{j}"
                new.append(helper.make_node(op.op_type, [x, *op.input[1:]], [out], name=out, domain=op.domain))
                new[-1].attribute.extend(op.attribute)
                x = out
            parts.append(x)
        new += [
            helper.make_node("Concat", parts, [p], name=p, axis=3),
            helper.make_node("Transpose", [p], list(node.output), perm=NCHW, name=f"{p}_nchw"),
        ]
        replace[node.output[0]] = new
        done.append(f"Concat {_label(node)} of {len(parts)} branches ({sum(map(bool, sources))} channels-last) concatenated channels-last")
    if not done:
        return []
    nodes = []  # in the Concat's place: everything they read comes before it
    for node in graph.node:
        nodes += replace.get(node.output[0], [node]) if node.op_type == "Concat" else [node]
    _set_nodes(model, nodes)
    return done


def cancel_transpose_pairs(model) -> list[str]:
    """``Transpose(Transpose(x))`` whose permutations compose to the identity -> ``x``: its readers
    read ``x``. One that is a graph output, or read inside a Scan / Loop body, stays."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    kept = {o.name for o in graph.output}
    for node in graph.node:
        kept |= _reads(node) - set(node.input)  # outer names its bodies read
    rename, count = {}, 0
    for node in graph.node:
        inner = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if inner is None or inner.op_type != "Transpose" or node.output[0] in kept:
            continue
        p1, p2 = _perm(inner), _perm(node)
        if p1 and len(p1) == len(p2) and all(p1[p2[i]] == i for i in range(len(p2))):
            rename[node.output[0]] = inner.input[0]
            count += 1
    if not count:
        return []
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    remove_dead_nodes(model)
    return [f"{count} pair(s) of Transposes that cancel dropped"]


# ops a channels-first tensor passes through on its way to convolutions while IREE keeps it
# channels-last (its transposes propagate through elementwise ops)
_ELEMENTWISE = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Identity", "Add", "Sub", "Mul", "Div", "BatchNormalization",
}


def _read_channels_last(name: str, readers: dict, outputs: set) -> bool:
    """Whether every path from ``name`` through elementwise ops ends at a ``Conv`` /
    ``ConvTranspose`` or at a ``Transpose`` to channels-last: IREE runs those channels-last
    (``iree-preprocessing-convert-conv-to-channels-last``), so a channels-last producer's
    transposes cancel against theirs. A graph output or any other reader (GroupNorm's Reshape,
    a Concat, ...) reads it channels-first."""
    todo, seen = [name], set()
    while todo:
        value = todo.pop()
        if value in outputs or not readers.get(value):
            return False
        for node in readers[value]:
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if node.op_type in ("Conv", "ConvTranspose") or (node.op_type == "Transpose" and perm == [[0, 2, 3, 1]]):
                continue
            if node.op_type not in _ELEMENTWISE:
                return False
            if node.output[0] not in seen:
                seen.add(node.output[0])
                todo.append(node.output[0])
    return True


@dataclass(frozen=True)
class PlainConv:
    """A ``Conv`` the convolution forms can rewrite (``_plain_conv``)."""

    cout: int
    c: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    input: tuple[int, int, int, int]  # n, c, h, w

    @property
    def out_hw(self) -> tuple[int, int]:
        (top, left, bottom, right), (h, w) = self.pads, self.input[2:]
        return tuple((size - k) // s + 1 for size, k, s in zip((h + top + bottom, w + left + right), self.kernel, self.strides))


def _plain_convs(graph) -> tuple[dict, dict, list]:
    """The convolution forms' common start: the graph's initializers by name, its static shapes, and
    every node paired with its ``_plain_conv`` (None for the others)."""
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    return inits, shapes, [(node, _plain_conv(node, inits, shapes)) for node in graph.node]


def _plain_conv(node, inits: dict, shapes: dict) -> PlainConv | None:
    """``node`` as a ``PlainConv`` when it is a 2-D ``Conv`` with a constant 4-D weight, one group,
    no dilation, explicit pads and a static 4-D input; else None. The weight's shape comes from
    the initializer's dims (a form reads the weight only for a Conv it rewrites)."""
    from onnx import helper

    if node.op_type != "Conv" or node.input[1] not in inits:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ws = list(inits[node.input[1]].dims)
    dims = _static_shape(shapes, node.input[0])
    if (
        len(ws) != 4 or dims is None or len(dims) != 4 or attrs.get("group", 1) != 1
        or any(d != 1 for d in attrs.get("dilations", [])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
    ):
        return None
    return PlainConv(
        ws[0], ws[1], (ws[2], ws[3]), tuple(attrs.get("strides", [1, 1])), tuple(attrs.get("pads", [0, 0, 0, 0])), tuple(dims)
    )


# Winograd F(4x4, 3x3) (``winograd_convs``): output tiles of 4 x 4 from 6 x 6 input tiles, 36
# products per tile pixel-channel pair against the direct convolution's 144. The points 0, 1, -1,
# 1/2, -2 (and infinity) give fp32 results 2.5x closer to float64 than Lavin's 0, +-1, +-2 (one
# 128-channel layer: max error 1.0e-5 against 2.5e-5, direct fp32 1.8e-6, F(2x2, 3x3) 1.6e-6).
WINOGRAD_TILE = 4
WINOGRAD_POINTS = (0.0, 1.0, -1.0, 0.5, -2.0)
# narrower (CenterPoint's 64 -> 1-3 channel head outputs) stay ``shifted_output_convs``; from 16,
# SMOKE's 16-channel full-resolution conv and the 27-channel DCN offset convs of SMOKE and PGD
# take the form too (two threads: SMOKE 1246-1263 -> 1086-1168 ms, PGD 7544-7647 -> 6714-6988 ms)
WINOGRAD_MIN_CHANNELS = 16
# Winograd convolutions on one padded input share their products (``winograd_convs``: one MatMul a
# tile point with their kernels side by side) when that input's tiles, the products' left side,
# take this many bytes or more a point: beyond the cache, each MatMul re-reads them from memory.
# One Xeon, 36 points, two threads: [2500, 384] with 5 x 64 columns 278 -> 245 ms, with 2 x 64
# 191 -> 137 ms, [1400, 256] 2 x 64 73 -> 52 ms; small sides lose ([2025, 64], 6 x 64: 66 -> 86 ms).
# Measured with data-tiled products only, so products that are not data-tiled stay one MatMul a convolution
WINOGRAD_SHARED_LHS_BYTES = 1 << 20


def _rows_vectorise(rows: int) -> bool:
    """Whether IREE 3.13 vectorises a matmul (not data-tiled) over ``rows`` static rows well: its
    CPU configuration takes as row tile the largest divisor of ``rows`` up to 8 and as workgroup
    tile a divisor up to 64 (of 8 where it can), and runs well when the row tile is 5 or more,
    divides the workgroup tile, and the workgroup tile is at least 32 rows. Winograd products
    ``[rows, c] x [c, cout]``, one Xeon thread, 36 of them: 529 rows (23 x 23 tiles; row tile 1)
    88.5 ms at 256 channels, 552 (23 x 24; 8) 24.9 ms; at 128 channels 2025 rows (5, workgroup
    45) 27.0 ms, 2160 (8) 27.1, 2070 (6, workgroup 46) 41.9, 2116 (4) 50.8. At 256 channels
    (thirty-seventh session), workgroups of 35-55 rows ran at 97-119 GFLOP/s (105, 135, 175, 225,
    275, 875, 1125, 2345 rows), of 5-30 rows at 50-59 (335, 402, 469; 325-625 with 25; 1876 with
    28, 2010 with 30): PGD's 15 x 25 tiles (375 rows) 35.1 ms, 16 x 25 (400) 16.1 ms. Fewer than
    8 rows are one tile."""
    if rows % 8 == 0 or rows < 8:
        return True
    row_tile = max(d for d in range(1, 9) if rows % d == 0)
    workgroup = max(d for d in range(1, 65) if rows % d == 0)
    return row_tile >= 5 and workgroup % row_tile == 0 and workgroup >= 32


def _product_grid(n: int, th: int, tw: int) -> tuple[int, int]:
    """The output tile grid of a Winograd convolution whose products IREE does not data-tile:
    ``th x tw`` or, where its ``n * th * tw`` rows vectorise badly (``_rows_vectorise``), the
    smallest grid at least as large whose rows do (8 more tile columns always reach a multiple of
    8); the padding tiles compute zeros that the output Slice drops."""
    grids = [(th + i, tw + j) for i in range(8) for j in range(8) if _rows_vectorise(n * (th + i) * (tw + j))]
    return min(grids, key=lambda g: (g[0] * g[1], g[0]))


def winograd_matrices(m: int, r: int, points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Toom-Cook matrices ``(BT [a, a], G [a, r], AT [m, a])``, ``a = m + r - 1``, of the 1-D
    correlation ``y[i] = sum_k g[k] d[i + k]`` (``i < m``, ``d`` of length ``a``) at ``a - 1``
    finite ``points`` and infinity: ``y = AT @ ((G @ g) * (BT @ d))``. The correlation is the
    transpose of the product of polynomials of degrees ``m - 1`` and ``r - 1``: evaluate both at
    the points (infinity: the leading coefficient), multiply, interpolate. ``AT`` is the first
    one's evaluation transposed, ``G`` the second's, ``BT`` the interpolation's transpose; each
    finite point's row of ``BT`` is scaled by ``prod(p_j - p_l)`` and its row of ``G`` divided by
    it, which keeps ``BT``'s entries small."""
    a = m + r - 1
    p = np.asarray(points, np.float64)
    if len(p) != a - 1 or len(set(points)) != len(points):
        raise ValueError(f"F({m}, {r}) needs {a - 1} distinct finite points, got {points}")

    def evaluation(n: int) -> np.ndarray:  # rows: powers 0..n-1 of each point; last row: infinity
        e = np.zeros((a, n))
        e[:-1] = p[:, None] ** np.arange(n)
        e[-1, -1] = 1.0
        return e

    scale = np.ones(a)
    scale[:-1] = [np.prod([pj - pl for pl in np.delete(p, j)]) for j, pj in enumerate(p)]
    return scale[:, None] * np.linalg.inv(evaluation(a)).T, evaluation(r) / scale[:, None], evaluation(m).T


def winograd_convs(model, tiled_products: bool = True) -> list[str]:
    """A stride-1 3x3 ``Conv`` (``_plain_conv``, at least 16 input and output channels, output at
    least 4 x 4) -> Winograd F(4x4, 3x3), channels-last: the padded input as 6 x 6 tiles
    overlapping by 2 (``BT d BT^T``: two linear passes of Slices times constant vectors, summed; the
    first over every 4th padded row, the second over its result's 4-column blocks), 36 ``MatMul`` s
    ``[tiles, c] x [c, cout]`` on a ``Split`` of the tiles (against the weights transformed once
    here, ``G g G^T``, in float64), ``Concat`` ed,
    and the output tiles' ``AT m AT`` (two such passes; the second also interleaves the tiles and
    adds the bias). Convolutions on one padded input whose tiles are large
    (``WINOGRAD_SHARED_LHS_BYTES``: SSN's five 384 -> 64 heads) share their products, one MatMul a
    point against their kernels side by side, each reading its columns. 2.25 products per output
    pixel and channel pair instead of 9; the same function
    up to fp32 rounding (``WINOGRAD_POINTS``). A stride-2 3x3 ``Conv`` that reads the same padded
    input as one of these takes the form too, as every other row and column of the stride-1
    convolution (a strided ``Slice`` of the output): as many products as the direct convolution, but
    in the matmul kernels and on the input tiles already there (SSN's two 384 -> 64 channel heads on
    its 200 x 200 neck, the direct ones 121 ms + 21 ms of padding and packing on one Xeon thread;
    the model 930.9 -> 875.2 ms on one thread, 522.5 -> 478.4 ms on two). Each pass writes its 6
    (or 4) results beside the channels or the tile columns, not as the outermost axis, where IREE's
    dispatch read its whole input once per result (one Xeon thread, the first output pass:
    SECOND's 128-channel 200 x 176 convolution 13.0 -> 8.4 ms, PointPillars' 128-channel one 4.2
    -> 1.3 ms).

    Applied when IREE's flags data-tile (``codegen.iree.DATA_TILING``, where the measurements
    on an AVX-512 Xeon are): the products then run in its matmul ukernels. With im2col
    (``codegen.iree.IM2COL_CONVS``, hosts without AVX-512; 8 x 8 x 1 tiles, 60-75 GFLOP/s on a
    Zen 3 core), one Zen 3 thread, 3x3 conv + ReLU, ``shifted_output_convs`` -> this form:
    32 channels at 248 x 216 37.5 -> 23.4 ms, 64 88 -> 50 ms, 128 at 124 x 108 75 -> 35-39 ms,
    256 at 62 x 54 63-69 -> 24-32 ms; 64 -> 256 channels at 96 x 320 (IREE's im2col; the
    shifted form is not taken with more output than input channels) 163 -> 116 ms.
    F(2x2, 3x3) gained less (90, 63, 38 ms for 64-256 channels). Unlike the shifted sums, the
    output transform costs about the same when the result is read channels-first (PGD's and
    SMOKE's GroupNorm towers: PGD 10.5 -> 7.0 s with them, 9.6-10.0 s without). Narrower
    convolutions (``WINOGRAD_MIN_CHANNELS``) are left to ``shifted_output_convs``.

    36 plain MatMuls, not one batched MatMul: IREE's ``batch_mmt4d`` dispatch writes each 8 x 8
    output tile three times (its unpack, then a copy out to the stack and back) and ran
    ``[36, 2200, 128] x [36, 128, 128]`` in 55-63 ms against 36 x 1.07 ms split (one Zen 3 thread);
    PointPillars 616-628 -> 547-548 ms on one thread, 335-339 -> 298-317 ms on two (best of 8-12
    calls). It costs compile time (PointPillars' iree-compile 13.5 -> 27 s). Applied to the IREE
    copy only (``codegen.iree.iree_onnx``).

    ``tiled_products=False``: IREE will not data-tile these products (the graph's gathered-row
    matmuls drop matmul data tiling, ``codegen.iree.GATHERED_ROWS_MIN_K``), so the tile grid grows
    where its row count would vectorise badly (``_product_grid``): BEVFusion's 90 x 90 BEV maps,
    23 x 23 tiles -> 23 x 24: their products 436.6 -> 132.0 ms a frame on one Xeon thread, the
    model 3063 -> 2753 ms (two threads 1713 -> 1563 ms), the same outputs."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, _, pairs = _plain_convs(graph)
    m = WINOGRAD_TILE
    a = m + 2
    bt, g, at = winograd_matrices(m, 3, WINOGRAD_POINTS)

    def eligible(conv, strides) -> bool:
        return (
            conv is not None and conv.kernel == (3, 3) and conv.strides == strides
            and min(conv.c, conv.cout) >= WINOGRAD_MIN_CHANNELS
        )

    def stride_1(conv) -> bool:
        return eligible(conv, (1, 1)) and min(conv.out_hw) >= m

    # the inputs (and pads) of the stride-1 convolutions this form takes: a stride-2 one reading the same
    # padded input takes the form too, as the stride-1 convolution's every other row and column
    shared = {(node.input[0], conv.pads) for node, conv in pairs if stride_1(conv)}
    taken = {id(node) for node, conv in pairs if stride_1(conv) or (eligible(conv, (2, 2)) and (node.input[0], conv.pads) in shared)}

    def tile_grid(conv) -> tuple[int, int, int, int]:
        """The stride-1 output (a stride-2 convolution subsamples it) and its tile grid."""
        (top, left, bottom, right), (h, w) = conv.pads, conv.input[2:]
        ho, wo = conv.out_hw if conv.strides == (1, 1) else (h + top + bottom - 2, w + left + right - 2)
        th, tw = -(-ho // m), -(-wo // m)
        if not tiled_products:
            th, tw = _product_grid(conv.input[0], th, tw)
        return ho, wo, th, tw

    def key(node, conv) -> tuple:
        return node.input[0], conv.pads, tile_grid(conv)[2:]

    # the convolutions whose products are one MatMul a point (WINOGRAD_SHARED_LHS_BYTES), by input, pads and grid
    groups: dict[tuple, list] = {}
    for node, conv in pairs:
        if id(node) in taken:
            groups.setdefault(key(node, conv), []).append((node, conv))
    sharing = {
        k: group for k, group in groups.items()
        if tiled_products and len(group) > 1 and 4 * group[0][1].c * group[0][1].input[0] * math.prod(k[2]) >= WINOGRAD_SHARED_LHS_BYTES
    }
    made: dict = {}  # a sharing group's key (or an unshared Conv's id) -> its products
    done, nodes = [], []
    for node, conv in pairs:
        if id(node) not in taken:
            nodes.append(node)
            continue
        cout, c = conv.cout, conv.c
        n, _, h, w = conv.input
        top, left, bottom, right = conv.pads
        ho, wo, th, tw = tile_grid(conv)
        step_ = conv.strides[0]
        grid = ""
        if not tiled_products and (th, tw) != (-(-ho // m), -(-wo // m)):
            grid = f" on {th} x {tw} tiles (not {-(-ho // m)} x {-(-wo // m)})"
        p = f"{_label(node)}_form_winograd"
        count = iter(range(1 << 30))

        def const(values, dtype=np.int64) -> str:
            name = f"{p}_c{next(count)}"
            graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), name))
            return name

        def step(op: str, ins: list, out: str | None = None, **attrs) -> str:
            out = out or f"{p}_{op.lower()}{next(count)}"
            nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
            return out

        def part(x: str, axis: int, start: int, end: int) -> str:
            return step("Slice", [x, const([start]), const([end]), const([axis])])

        def combine(terms, shape, extra=()) -> str:
            """Sum of ``x * vector`` (the vector laid along ``shape``'s non-1 axis) over ``terms``."""
            scaled = [step("Mul", [x, const(v.reshape(shape), np.float32)]) for x, v in terms if v.any()]
            return step("Sum", [*scaled, *extra])

        # input tiles from the padded input, m * (th + 1) rows of m * (tw + 1) columns: tile row t's input row j
        # is padded row m * t + j. Each pass writes its ``a`` results beside the channels, so it reads its input
        # once (see the docstring). The first reads input row j of every tile as one strided Slice of the rows,
        # whose only unit axis is the one it broadcasts over (no batch axis for one image): IREE 3.13 copies a
        # Slice it must reshape before the pass reads it (the block and batch axes of the earlier form: six
        # copy dispatches a conv). Two threads, interleaved: SECOND 662.6 -> 641.2 ms, PointPillars 260.4 ->
        # 244.6 ms, PGD 4427 -> 4378 ms (its copies ran in one workgroup); a chain of three 128-channel convs
        # alone 139.4 -> 144.7 ms (its column pass slower, the same code)
        k = key(node, conv)
        members = sharing.get(k, [(node, conv)])  # the convolutions whose products these are
        k = k if len(members) > 1 else id(node)
        if k not in made:
            padded = step("Pad", [step("Transpose", [node.input[0]], perm=[0, 2, 3, 1]),
                                  const([0, top, left, 0, 0, m * (th + 1) - h - top, m * (tw + 1) - w - left, 0])])
            batch = [n] if n > 1 else []
            b = len(batch)
            padded = step("Reshape", [padded, const([*batch, m * (th + 1), m * (tw + 1), 1, c])])
            rows = combine(
                [(step("Slice", [padded, const([j]), const([j + m * (th - 1) + 1]), const([b]), const([m])]), bt[:, j]) for j in range(a)],
                (*[1] * b, 1, 1, a, 1),
            )  # [(n,) th, columns, a (tile row), c]
            rows = step("Reshape", [rows, const([*batch, th, tw + 1, m, a, c])])
            lo, hi = part(rows, b + 1, 0, tw), part(rows, b + 1, 1, tw + 1)
            tiles = combine([(part(lo if j < m else hi, b + 2, j % m, j % m + 1), bt[:, j]) for j in range(a)], (*[1] * b, 1, 1, a, 1, 1))
            # [(n,) th, tw, a (tile column), a (tile row), c] -> 36 MatMuls [tiles, c] x [c, cout], one per tile
            # point, on a Split of [a, a, tiles, c]; their Concat is [a, a, tiles, cout]
            lhs = step("Transpose", [tiles], perm=[b + 3, b + 2, *range(b + 2), b + 4])
            lhs = step("Reshape", [lhs, const([a * a * n * th * tw, c])])
            parts = [f"{p}_lhs{i}" for i in range(a * a)]
            sizes = const([n * th * tw] * (a * a))  # Split's sizes input: opset 13+
            nodes.append(helper.make_node("Split", [lhs, sizes], parts, name=f"{p}_split", axis=0))
            weights = [numpy_helper.to_array(inits[x.input[1]]).astype(np.float64) for x, _ in members]
            kernel = np.concatenate([np.einsum("ai,kcij,bj->abck", g, weight, g) for weight in weights], axis=-1).reshape(a * a, c, -1)
            products = step("Concat", [step("MatMul", [x, const(kernel[i], np.float32)]) for i, x in enumerate(parts)], axis=0)
            products = made[k] = step("Reshape", [products, const([a, a, n, th, tw, kernel.shape[-1]])])
        products = made[k]
        if len(members) > 1:  # this convolution's columns of the shared products
            first = sum(other.cout for _, other in members[: next(i for i, (x, _) in enumerate(members) if x is node)])
            products = part(products, 5, first, first + cout)
        # output tiles: AT along the tile rows -> [n, th, m, a (tile column), tw, cout], then along the
        # columns, interleaved to [n, th, m, tw, m, cout]
        out_rows = combine(
            [(step("Transpose", [part(products, 0, i, i + 1)], perm=[2, 3, 0, 1, 4, 5]), at[:, i]) for i in range(a)],
            (1, 1, m, 1, 1, 1),
        )
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        out = combine(
            [(step("Reshape", [part(out_rows, 3, j, j + 1), const([n, th, m, tw, 1, cout])]), at[:, j]) for j in range(a)],
            (1, 1, 1, 1, m, 1),
            bias,
        )
        out = step("Slice", [step("Reshape", [out, const([n, m * th, m * tw, cout])]), const([0, 0]), const([ho, wo]), const([1, 2]),
                             const([step_, step_])])
        step("Transpose", [out], node.output[0], perm=[0, 3, 1, 2])
        shares = f", products shared by {len(members)} convolutions" if len(members) > 1 else ""
        stride = ", stride 2" if step_ > 1 else ""
        done.append(f"Conv {_label(node)} (3x3{stride}, {c} -> {cout} channels) as Winograd F(4x4, 3x3){grid}{shares}")
    if done:
        _set_nodes(model, nodes)  # the replaced weights
    return done


def shifted_output_convs(model) -> list[str]:
    """A stride-1 ``Conv`` (constant 4-D weight ``[cout, c, kh, kw]`` with ``kh * kw > 1``, one
    group, no dilation, explicit pads, static input shape, ``cout <= c``) -> one channels-last
    ``MatMul`` of every padded input pixel with all ``kh * kw`` kernel taps at once
    (``[pixels, c] x [c, taps * cout]``) and a ``Sum`` of ``kh * kw`` shifted ``Slice`` s of its
    result (tap ``(dy, dx)``'s columns, rows shifted by ``(dy, dx)``) plus the bias: the same
    products, summed per output pixel in another order.

    For IREE's im2col convolutions (``codegen.iree.IM2COL_CONVS``, hosts without AVX-512):
    IREE 3.13 writes the im2col matrix straight into the data-tiled matmul's 8 x 1 LHS tiles, a
    transposing gather at ~2.5 GB/s (PointPillars' 124 x 108, 128-channel 3x3 conv, one Zen 3
    thread: 26 ms gather + 54 ms product). Here only the input is packed (its 1/9th), and the
    shifted sums are one vectorised elementwise dispatch: 72 ms (64 channels at 248 x 216: 112 ->
    88 ms; 256 at 62 x 54: 76 -> 61 ms; docs/iree.md, twenty-fifth session). ``cout <= c`` keeps
    the product's result no larger than the im2col matrix it replaces (64 -> 128 channels: 50 ->
    130 ms). Only where the result stays channels-last (``_read_channels_last``) or is small
    (``8 * cout <= c``: CenterPoint's and PGD's last head convolutions): written back
    channels-first, the shifted sums become a transposing dispatch (128 channels: 6 -> 52 ms).
    Applied to the IREE copy only, when its flags send convolutions through im2col
    (``codegen.iree.iree_onnx``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, _, pairs = _plain_convs(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    done, nodes = [], []
    for node, conv in pairs:
        if (
            conv is None or conv.kernel == (1, 1) or conv.strides != (1, 1) or conv.cout > conv.c
            or not (8 * conv.cout <= conv.c or _read_channels_last(node.output[0], readers, outputs))
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        cout, c, (kh, kw) = conv.cout, conv.c, conv.kernel
        n, _, h, w = conv.input
        top, left, bottom, right = conv.pads
        hp, wp = h + top + bottom, w + left + right
        (ho, wo), taps = conv.out_hw, kh * kw
        p = f"{_label(node)}_form_shift"
        consts = {
            "pads": np.array([0, top, left, 0, 0, bottom, right, 0], np.int64),
            "rows": np.array([n * hp * wp, c], np.int64),
            "taps": weight.transpose(1, 2, 3, 0).reshape(c, taps * cout),  # columns (dy, dx, cout)
            "grid": np.array([n, hp, wp, taps * cout], np.int64),
            "axes": np.array([1, 2, 3], np.int64),
        }
        for t in range(taps):
            dy, dx = divmod(t, kw)
            consts[f"start{t}"] = np.array([dy, dx, t * cout], np.int64)
            consts[f"end{t}"] = np.array([dy + ho, dx + wo, (t + 1) * cout], np.int64)
        for key, values in consts.items():
            graph.initializer.append(numpy_helper.from_array(values, f"{p}_{key}"))
        step = lambda op, ins, out, **a: helper.make_node(op, ins, [f"{p}_{out}"], name=f"{p}_{out}", **a)  # noqa: E731
        nodes += [
            step("Transpose", [node.input[0]], "nhwc", perm=[0, 2, 3, 1]),
            step("Pad", [f"{p}_nhwc", f"{p}_pads"], "padded"),
            step("Reshape", [f"{p}_padded", f"{p}_rows"], "pixels"),
            step("MatMul", [f"{p}_pixels", f"{p}_taps"], "products"),
            step("Reshape", [f"{p}_products", f"{p}_grid"], "products_grid"),
        ]
        nodes += [step("Slice", [f"{p}_products_grid", f"{p}_start{t}", f"{p}_end{t}", f"{p}_axes"], f"tap{t}") for t in range(taps)]
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        nodes += [
            step("Sum", [*(f"{p}_tap{t}" for t in range(taps)), *bias], "sum"),
            helper.make_node("Transpose", [f"{p}_sum"], [node.output[0]], name=p, perm=[0, 3, 1, 2]),
        ]
        done.append(f"Conv {_label(node)} ({kh}x{kw}, {c} -> {cout} channels) as one MatMul over its taps + shifted sums")
    if done:
        _set_nodes(model, nodes)  # the replaced weights
    return done


#: ``strided_convs_as_space_to_depth``: the most input channels x stride area it takes (IREE's
#: data-tiled convolutions pad the input channels to tiles of 16 on AVX-512)
SPACE_TO_DEPTH_MAX_CHANNELS = 16


def strided_convs_as_space_to_depth(model) -> list[str]:
    """A ``Conv`` with equal strides ``s > 1``, a kernel wider than ``s`` and few input channels
    (``c * s * s <= SPACE_TO_DEPTH_MAX_CHANNELS``) on a static ``[1, c, h, w]`` input
    (``_plain_conv``) -> its padded input rearranged space-to-depth, ``[1, s * s * c, h' / s, w' /
    s]`` (channel ``(p * s + q) * c + ci`` holds pixel ``(s * y + p, s * x + q)`` of channel
    ``ci``), and a stride-1 ``Conv`` with a ``ceil(k / s)``-tap kernel over it: the weight padded
    with zero taps to a multiple of ``s`` and regrouped the same way. The same products, plus the
    zero taps' (``s * ceil(k / s)`` against ``k`` a side).

    For IREE where convolutions are data-tiled (``codegen.iree.CONV_DATA_TILING``): their tiles
    pad the input channels to 16, so PGD's 7x7 stem over 3 channels multiplied 16 x 49 taps a
    pixel where ``3 x 49`` are needed, at ~20 GFLOP/s of useful work; as 12 channels with a 4x4
    kernel, 16 x 16. Convolutions whose padded input would need cropping (``h + pads`` beyond
    ``s * (ho + ceil(k / s) - 1)``) are left alone. Applied to the IREE copy only
    (``codegen.iree.iree_onnx``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, _, pairs = _plain_convs(graph)
    done, nodes = [], []
    for node, conv in pairs:
        s = conv.strides[0] if conv else 0
        if not (
            conv and s > 1 and conv.strides == (s, s) and min(conv.kernel) > s and conv.input[0] == 1
            and conv.c * s * s <= SPACE_TO_DEPTH_MAX_CHANNELS
        ):
            nodes.append(node)
            continue
        (top, left, bottom, right), (_, c, h, w) = conv.pads, conv.input
        taps = tuple(-(-k // s) for k in conv.kernel)  # the new kernel, a side
        rows, cols = (s * (o + t - 1) for o, t in zip(conv.out_hw, taps))  # the padded input the new conv reads
        if rows < h + top + bottom or cols < w + left + right:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        padded = np.zeros((conv.cout, c, s * taps[0], s * taps[1]), weight.dtype)
        padded[:, :, : conv.kernel[0], : conv.kernel[1]] = weight
        regrouped = padded.reshape(conv.cout, c, taps[0], s, taps[1], s).transpose(0, 3, 5, 1, 2, 4)
        p = f"{_label(node)}_form_s2d"
        consts = {
            "_pads": np.array([0, 0, top, left, 0, 0, rows - h - top, cols - w - left], np.int64),
            "_split_shape": np.array([c, rows // s, s, cols // s, s], np.int64),
            "_shape": np.array([1, s * s * c, rows // s, cols // s], np.int64),
            "_w": np.ascontiguousarray(regrouped.reshape(conv.cout, s * s * c, *taps)),
        }
        graph.initializer.extend(numpy_helper.from_array(v, p + k) for k, v in consts.items())
        bias = list(node.input[2:3])
        nodes += [
            helper.make_node("Pad", [node.input[0], p + "_pads"], [p + "_padded"], name=p + "_padded"),
            helper.make_node("Reshape", [p + "_padded", p + "_split_shape"], [p + "_split"], name=p + "_split"),
            helper.make_node("Transpose", [p + "_split"], [p + "_phases"], perm=[2, 4, 0, 1, 3], name=p + "_phases"),
            helper.make_node("Reshape", [p + "_phases", p + "_shape"], [p + "_x"], name=p + "_x"),
            helper.make_node("Conv", [p + "_x", p + "_w", *bias], list(node.output), name=p, kernel_shape=list(taps)),
        ]
        done.append(
            f"Conv {_label(node)} ({conv.kernel[0]}x{conv.kernel[1]}, stride {s}, {c} channels) as a "
            f"{taps[0]}x{taps[1]} Conv over its input space-to-depth ({s * s * c} channels)"
        )
    if done:
        _set_nodes(model, nodes)  # the replaced weights
    return done


def grouped_deconvs_as_convs(model) -> list[str]:
    """A grouped 2-D ``ConvTranspose`` (constant weight, static input shape) -> a grouped ``Conv``
    with stride 1 over the zero-stuffed input (``s - 1`` zero rows and columns after each pixel,
    then ``d (k - 1) - pad`` zeros around) with the kernel flipped and its in / out channels
    swapped within each group: the same products, summed per output pixel.

    iree-compile 3.13 rejects grouped ConvTransposes ("'tensor.collapse_shape' op expected
    reassociation map #0 to have size equal to the expanded rank (5)"): SMOKE's DLA neck
    upsamples with depthwise 4x4 / stride-2 ones. Applied to the IREE copy only
    (``codegen.iree.iree_onnx``); ungrouped ones compile (and stride-sized ones are MatMuls,
    ``rewrite_deconvs``).

    Depthwise ones whose kernel is a whole number of strides (and no dilation) take the phase
    form instead (``_depthwise_deconv_phases``): IREE ran the depthwise Conv over the zero-stuffed
    input at ~2.5 GFLOP/s, 3/4 of its products (15/16 at stride 4) with stuffed zeros."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    done, nodes = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
        x_shape = _static_shape(shapes, node.input[0]) if weight is not None else None
        group = attrs.get("group", 1)
        if weight is None or x_shape is None or len(x_shape) != 4 or group == 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            nodes.append(node)
            continue
        kh, kw = weight.dims[2:]
        sh, sw = attrs.get("strides", [1, 1])
        dh, dw = attrs.get("dilations", [1, 1])
        pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
        oph, opw = attrs.get("output_padding", [0, 0])
        before = [dh * (kh - 1) - pt, dw * (kw - 1) - pl]
        after = [dh * (kh - 1) - pb + oph, dw * (kw - 1) - pr + opw]
        if min(before + after) < 0:  # would need cropping: left alone
            nodes.append(node)
            continue
        n, ci, h, w = x_shape
        co_g = weight.dims[1]
        ci_g = ci // group
        p = f"{_label(node)}_form"
        if ci_g == co_g == 1 and kh % sh == 0 and kw % sw == 0 and (dh, dw) == (1, 1) and pb >= oph and pr >= opw:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            kernel = numpy_helper.to_array(weight)[:, 0]  # [C, kh, kw]
            out_hw = ((h - 1) * sh + kh - pt - pb + oph, (w - 1) * sw + kw - pl - pr + opw)
            nodes += _depthwise_deconv_phases(graph, p, node.input[0], bias, node.output[0], kernel, (n, ci, h, w), (sh, sw), (pt, pl), out_hw)
            done.append(f"ConvTranspose {_label(node)} ({kh}x{kw}, stride [{sh}, {sw}], {group} groups) as {sh * sw} phases of shifted products")
            continue
        kernel = numpy_helper.to_array(weight).reshape(group, ci_g, co_g, kh, kw).transpose(0, 2, 1, 3, 4)
        kernel = np.ascontiguousarray(kernel.reshape(group * co_g, ci_g, kh, kw)[:, :, ::-1, ::-1])
        consts = {
            "w": kernel,
            "axes": np.array([3, 5], np.int64),
            "stuff": np.array([0] * 6 + [0, 0, 0, sh - 1, 0, sw - 1], np.int64),
            "shape": np.array([n, ci, h * sh, w * sw], np.int64),
            "starts": np.array([0, 0], np.int64),
            "ends": np.array([(h - 1) * sh + 1, (w - 1) * sw + 1], np.int64),
            "slice_axes": np.array([2, 3], np.int64),
            "pads": np.array([0, 0, *before, 0, 0, *after], np.int64),
        }
        for key, value in consts.items():
            graph.initializer.append(numpy_helper.from_array(value, f"{p}_{key}"))
        conv_inputs = [f"{p}_padded", f"{p}_w"] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
        nodes += [
            helper.make_node("Unsqueeze", [node.input[0], f"{p}_axes"], [f"{p}_6d"], name=f"{p}_6d"),
            helper.make_node("Pad", [f"{p}_6d", f"{p}_stuff"], [f"{p}_stuffed_6d"], name=f"{p}_stuffed_6d"),
            helper.make_node("Reshape", [f"{p}_stuffed_6d", f"{p}_shape"], [f"{p}_stuffed"], name=f"{p}_stuffed"),
            helper.make_node("Slice", [f"{p}_stuffed", f"{p}_starts", f"{p}_ends", f"{p}_slice_axes"], [f"{p}_cut"], name=f"{p}_cut"),
            helper.make_node("Pad", [f"{p}_cut", f"{p}_pads"], [f"{p}_padded"], name=f"{p}_padded"),
            helper.make_node(
                "Conv", conv_inputs, list(node.output), name=p, group=group, kernel_shape=[kh, kw], dilations=[dh, dw]
            ),
        ]
        done.append(f"ConvTranspose {_label(node)} ({kh}x{kw}, stride [{sh}, {sw}], {group} groups) as a grouped Conv over the zero-stuffed input")
    if done:
        _set_nodes(model, nodes, prune=False)
    return done


def _depthwise_deconv_phases(graph, p: str, x: str, bias, out: str, kernel, x_shape, strides, start, out_hw) -> list:
    """A depthwise ``ConvTranspose`` as sums of shifted products, one per output phase: with
    ``m = k / s`` taps an axis, output row ``u = q s + r`` of the uncropped result is
    ``sum_j x[q - j] w[r + j s]`` (x zero outside), so phase ``(ry, rx)`` is the sum of
    ``m_h m_w`` Slices of x padded by ``m - 1`` zeros, each times its tap's per-channel weight.
    The phases are interleaved (Concat + Reshape) and cropped to the output (the pads); no
    product with a stuffed zero."""
    from onnx import helper, numpy_helper

    n, c, h, w = x_shape
    sh, sw = strides
    mh, mw = kernel.shape[1] // sh, kernel.shape[2] // sw
    hq, wq = h + mh - 1, w + mw - 1  # phase rows / columns
    consts = {
        "pads": np.array([0, 0, mh - 1, mw - 1, 0, 0, mh - 1, mw - 1], np.int64),
        "axes": np.array([2, 3], np.int64),
        "unsq": np.array([3, 5], np.int64),
        "shape": np.array([n, c, hq * sh, wq * sw], np.int64),
        "crop_starts": np.array(start, np.int64),
        "crop_ends": np.array([start[0] + out_hw[0], start[1] + out_hw[1]], np.int64),
    }
    for jy in range(mh):
        for jx in range(mw):
            consts[f"s{jy}_{jx}"] = np.array([mh - 1 - jy, mw - 1 - jx], np.int64)
            consts[f"e{jy}_{jx}"] = np.array([mh - 1 - jy + hq, mw - 1 - jx + wq], np.int64)
    for key, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(value, f"{p}_{key}"))
    nodes = [helper.make_node("Pad", [x, f"{p}_pads"], [f"{p}_xpad"], name=f"{p}_xpad")]
    for jy in range(mh):
        for jx in range(mw):
            name = f"{p}_x{jy}_{jx}"
            nodes.append(helper.make_node("Slice", [f"{p}_xpad", f"{p}_s{jy}_{jx}", f"{p}_e{jy}_{jx}", f"{p}_axes"], [name], name=name))
    rows = []
    for ry in range(sh):
        columns = []
        for rx in range(sw):
            phase = f"{p}_phase{ry}_{rx}"
            terms = []
            for jy in range(mh):
                for jx in range(mw):
                    tap = f"{phase}_w{jy}_{jx}"
                    weight = kernel[:, ry + jy * sh, rx + jx * sw].reshape(1, c, 1, 1)
                    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), tap))
                    nodes.append(helper.make_node("Mul", [f"{p}_x{jy}_{jx}", tap], [f"{tap}_term"], name=f"{tap}_term"))
                    terms.append(f"{tap}_term")
            total = terms[0]
            for i, term in enumerate(terms[1:]):
                nodes.append(helper.make_node("Add", [total, term], [f"{phase}_sum{i}"], name=f"{phase}_sum{i}"))
                total = f"{phase}_sum{i}"
            nodes.append(helper.make_node("Unsqueeze", [total, f"{p}_unsq"], [f"{phase}_6d"], name=f"{phase}_6d"))
            columns.append(f"{phase}_6d")
        nodes.append(helper.make_node("Concat", columns, [f"{p}_row{ry}"], name=f"{p}_row{ry}", axis=5))
        rows.append(f"{p}_row{ry}")
    nodes += [
        helper.make_node("Concat", rows, [f"{p}_phases"], name=f"{p}_phases", axis=3),  # [N, C, Hq, sh, Wq, sw]
        helper.make_node("Reshape", [f"{p}_phases", f"{p}_shape"], [f"{p}_full"], name=f"{p}_full"),
        helper.make_node(
            "Slice", [f"{p}_full", f"{p}_crop_starts", f"{p}_crop_ends", f"{p}_axes"], [out if bias is None else f"{p}_cropped"], name=f"{p}_crop"
        ),
    ]
    if bias is not None:
        graph.initializer.append(numpy_helper.from_array(np.array([1, c, 1, 1], np.int64), f"{p}_bias_shape"))
        nodes += [
            helper.make_node("Reshape", [bias, f"{p}_bias_shape"], [f"{p}_bias4d"], name=f"{p}_bias4d"),
            helper.make_node("Add", [f"{p}_cropped", f"{p}_bias4d"], [out], name=f"{p}_bias"),
        ]
    return nodes


def _set_nodes(model, nodes: list, prune: bool = True) -> None:
    """Make ``nodes`` the graph's nodes (a rewrite's result); with ``prune``, drop what nothing reads any more."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if prune:
        remove_dead_nodes(model)


def remove_dead_nodes(model) -> None:
    """Drop nodes and initializers nothing reads any more (what a rewrite replaced)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(_reads(node))  # Scan / Loop bodies read outer names too
    _set_nodes(model, keep[::-1], prune=False)
    unused = [t for t in graph.initializer if t.name not in needed]
    for t in unused:
        graph.initializer.remove(t)


def _scatter_reduction(node) -> str:
    """A scatter node's ``reduction`` attribute as a str (``"none"`` when absent)."""
    from onnx import helper

    value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "reduction"), b"none")
    return value.decode() if isinstance(value, bytes) else value


def _elem_types(graph) -> dict[str, int]:
    """The element type (``TensorProto`` enum) of every initializer and of every value whose type
    is inferred or declared."""
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _readers(graph) -> dict[str, list]:
    """Tensor name -> the nodes reading it."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _label(node) -> str:
    return node.name or node.output[0]


def _shapes(graph) -> dict[str, list]:
    shapes = {}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def cpu_forms(model) -> list[str]:
    """Apply the runtime-neutral forms to ``model`` (an onnx ModelProto, in place); return what
    was rewritten, node by node. Shapes are inferred first: the forms only touch nodes whose
    shapes are static."""
    import onnx

    model.CopyFrom(onnx.shape_inference.infer_shapes(model, data_prop=True))
    unshuffled: dict[str, Unshuffled] = {}
    rewrites = fold_constants(model)
    rewrites += identity_transposes_as_identities(model)
    rewrites += fold_deconv_batchnorms(model)
    rewrites += rewrite_deconvs(model, unshuffled)
    rewrites += split_concat_heads(model, unshuffled)
    rewrites += split_concat_matmuls(model)
    rewrites += fold_transposed_batchnorms(model)
    if rewrites:  # the shapes of what the forms so far built (the hoist reads them)
        topological_sort(model.graph)
        model.CopyFrom(onnx.shape_inference.infer_shapes(model, data_prop=True))
    rewrites += hoist_max_over_bias_relu(model)
    rewrites += select_scatters_as_concats(model)
    rewrites += flatten_row_scatters(model)
    if rewrites:
        topological_sort(model.graph)
    return rewrites


#: ``narrow_convs_as_shifted_pointwise``: the most output channels it takes (measured: 1-3 gain,
#: 4 barely, 6 and more lose), and onnxruntime's NCHWc channel block
SHIFTED_POINTWISE_MAX_CHANNELS = 3
NCHWC_BLOCK = 16


def narrow_convs_as_shifted_pointwise(model) -> list[str]:
    """A stride-1 ``Conv`` with at most ``SHIFTED_POINTWISE_MAX_CHANNELS`` outputs from many inputs
    (a ``PlainConv`` whose input channels are a multiple of 16 and at least twice the taps'
    padded outputs) -> three NCHWc Convs: a 1x1 Conv to every (tap, output channel) pair (``taps
    * cout`` channels, padded to 16), a depthwise Conv with the original pads whose one-hot
    kernels shift each channel by its tap, and a 1x1 Conv summing each output channel's taps
    (0/1 weights) plus the bias. The same products, summed in another order.

    onnxruntime pads a Conv's output channels to its 16-channel NCHWc block, so CenterPoint's
    head convolutions 64 -> 1-3 channels (3x3, 128 x 128) compute 16 channels: 1.2-1.3 ms each
    on two threads, 36 of them ~47 ms of CenterPoint pillar's ~430. The three Convs compute 16-32
    channels from the 64 once, not per tap: measured alone (two threads) 1.54 -> 0.57 ms (1
    channel), 1.53 -> 0.90 (2), 1.55 -> 0.87 (3); 4 channels 1.56 -> 1.26 with a ReduceSum
    instead of the summing Conv, 6 and more slower. model.onnx only (``onnxruntime_forms``):
    IREE's copy keeps the Conv (its own convolution forms)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, _, pairs = _plain_convs(graph)
    done, nodes = [], []
    for node, conv in pairs:
        taps = conv.kernel[0] * conv.kernel[1] if conv else 0
        width = -(-taps * conv.cout // NCHWC_BLOCK) * NCHWC_BLOCK if conv else 0
        if (
            conv is None or taps == 1 or conv.strides != (1, 1) or conv.cout > SHIFTED_POINTWISE_MAX_CHANNELS
            or conv.c % NCHWC_BLOCK or conv.c < 2 * width
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])  # [cout, c, kh, kw]
        cout, c, (kh, kw) = conv.cout, conv.c, conv.kernel
        p = f"{_label(node)}_form_shifted"
        pointwise = np.zeros((width, c, 1, 1), weight.dtype)  # channel t * cout + o: tap t of output o
        pointwise[: taps * cout, :, 0, 0] = weight.reshape(cout, c, taps).transpose(2, 0, 1).reshape(taps * cout, c)
        shift = np.zeros((width, 1, kh, kw), weight.dtype)
        summing = np.zeros((cout, width, 1, 1), weight.dtype)
        for t in range(taps):
            for o in range(cout):
                shift[t * cout + o, 0, t // kw, t % kw] = 1
                summing[o, t * cout + o, 0, 0] = 1
        for key, values in {"pointwise": pointwise, "shift": shift, "summing": summing}.items():
            graph.initializer.append(numpy_helper.from_array(values, f"{p}_{key}"))
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        nodes += [
            helper.make_node("Conv", [node.input[0], f"{p}_pointwise"], [f"{p}_taps"], name=f"{p}_taps"),
            helper.make_node("Conv", [f"{p}_taps", f"{p}_shift"], [f"{p}_shifted"], name=f"{p}_shift",
                             kernel_shape=[kh, kw], pads=list(conv.pads), group=width),
            helper.make_node("Conv", [f"{p}_shifted", f"{p}_summing", *bias], [node.output[0]], name=p),
        ]  # fmt: skip
        done.append(f"Conv {_label(node)} ({kh}x{kw}, {c} -> {cout} channels) as pointwise taps + depthwise shifts + a summing Conv for onnxruntime")
    if done:
        _set_nodes(model, nodes)  # the replaced weights
    return done


def concat_convs_as_partial_sums(model) -> list[str]:
    """A channel ``Concat`` of 4-D tensors read only by convolutions (``PlainConv``; every
    concatenated part a multiple of 16 channels) -> each Conv as one Conv per part with its slice
    of the weight, the bias on the first, summed with Adds: ``conv(concat(a, b), W) = conv(a, W_a)
    + conv(b, W_b)``, the same products. onnxruntime fuses each Add into the next part's NCHWc
    Conv (its sum input), so the concatenated tensor is never written: SSN's 384 channels at 200 x
    200 (an 11.8 ms Concat read by five 3x3 Convs, two threads), CenterPoint's, BEVFusion lidar's
    shared convolutions over SECONDFPN's output. ``split_concat_heads`` (1x1 heads, both runtimes)
    runs before and leaves these. model.onnx only (``onnxruntime_forms``): IREE fuses its concats."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = _shapes(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list] = {}  # id(Conv) -> its parts
    done = []
    for node in graph.node:
        found = _channel_concat_readers(node, readers, outputs, shapes, axes=(1, -3))
        users, widths = found or ([], [])
        if (
            found is None or len(node.input) < 2 or any(_plain_conv(user, inits, shapes) is None for user in users)
            or any(w % NCHWC_BLOCK for w in widths) or any(u.input[0] != node.output[0] for u in users)
        ):
            continue
        for user in users:
            weight = numpy_helper.to_array(inits[user.input[1]])
            attrs = {a.name: helper.get_attribute_value(a) for a in user.attribute}
            p = f"{_label(user)}_form_part"
            bias = [user.input[2]] if len(user.input) > 2 and user.input[2] else []
            parts, start = [], 0
            for i, (name, width) in enumerate(zip(node.input, widths)):
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, start : start + width]), f"{p}{i}_w"))
                start += width
                parts.append(helper.make_node("Conv", [name, f"{p}{i}_w", *(bias if i == 0 else [])], [f"{p}{i}"], name=f"{p}{i}", **attrs))
            total, last = parts[0].output[0], len(parts) - 1
            for i in range(1, last + 1):
                out = user.output[0] if i == last else f"{p}_sum{i}"
                parts.append(helper.make_node("Add", [total, f"{p}{i}"], [out], name=f"{p}_sum{i}"))
                total = out
            replaced[id(user)] = parts
        channels = " + ".join(map(str, widths))
        done.append(f"Concat {_label(node)} ({channels} channels) read by {len(users)} Conv(s) as partial Convs summed, for onnxruntime")
    if done:
        nodes = [n for node in graph.node for n in replaced.get(id(node), [node])]
        _set_nodes(model, nodes)  # the Concats and the whole weights
    return done


def onnxruntime_forms(model) -> list[str]:
    """The forms only ``model.onnx`` (onnxruntime's graph) gets, after ``cpu_forms``; IREE's copy
    is saved before them."""
    return deconvs_as_pointwise_convs(model) + narrow_convs_as_shifted_pointwise(model) + concat_convs_as_partial_sums(model)


def _reader_counts(graph) -> dict[str, int]:
    """How many nodes read each name (a graph output counts as one reader)."""
    readers: dict[str, int] = {o.name: 1 for o in graph.output}
    for node in graph.node:
        for name in _reads(node):
            readers[name] = readers.get(name, 0) + 1
    return readers


def _reads(node) -> set[str]:
    """Names ``node`` reads: its inputs and, for Scan / Loop / If, what its bodies read."""
    from onnx import AttributeProto

    names = set(node.input)
    for a in node.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for g in graphs:
            for inner in g.node:
                names |= _reads(inner)
    return names


def topological_sort(graph) -> None:
    """Order ``graph.node`` so that every node follows its producers (a rewrite emits its nodes
    where the replaced node was, which may precede a producer of a branch it now reads);
    otherwise stable."""
    import heapq

    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    deps = [{producer[n] for n in _reads(node) if n in producer and producer[n] != i} for i, node in enumerate(graph.node)]
    users: list[list[int]] = [[] for _ in graph.node]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:  # Kahn's algorithm, lowest original position first
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        raise ValueError("graph has a cycle")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
