"""Reading weights out of ONNX graphs by the nodes that use them.

The pretrained models we run (DeepFilterNet3, NSNet2) ship as ONNX exports.
We do not run those graphs; we read their weights into torch tensors and
run our own batched streaming code.  :class:`OnnxWeights` finds a weight by
the node that consumes it (e.g. the ``Conv`` whose output is
``/erb_conv0/1/Conv_output_0``), whether the exporter stored it as an
initializer or as a ``Constant`` node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper


@dataclass(frozen=True)
class GruWeights:
    """One single-direction GRU layer in torch gate order (r, z, n)."""

    w_ih: torch.Tensor  # [3H, I]
    w_hh: torch.Tensor  # [3H, H]
    b_ih: torch.Tensor  # [3H]
    b_hh: torch.Tensor  # [3H]

    @property
    def hidden_size(self) -> int:
        return int(self.w_hh.shape[1])


def _onnx_to_torch_gates(x: np.ndarray, hidden: int) -> np.ndarray:
    """ONNX stacks GRU gates as (z, r, h); torch as (r, z, n)."""
    z, r, h = x[:hidden], x[hidden : 2 * hidden], x[2 * hidden :]
    return np.concatenate([r, z, h], axis=0)


class OnnxWeights:
    """Weights of one ONNX model, looked up through the nodes that consume them."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.tensors: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in model.graph.initializer
        }
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.tensors[node.output[0]] = numpy_helper.to_array(attr.t)
        self.nodes_by_output = {out: node for node in model.graph.node for out in node.output}

    @classmethod
    def from_bytes(cls, data: bytes) -> OnnxWeights:
        return cls(onnx.load_model_from_string(data))

    def node(self, output: str, op_type: str) -> onnx.NodeProto:
        node = self.nodes_by_output.get(output)
        if node is None or node.op_type != op_type:
            raise KeyError(f"no {op_type} node produces {output!r}")
        return node

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.tensors[name], dtype=np.float32))

    def input_tensor(self, output: str, op_type: str, index: int) -> torch.Tensor:
        node = self.node(output, op_type)
        return self.tensor(node.input[index])

    def conv(self, output: str, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and (optional) bias of the Conv/ConvTranspose producing ``output``."""
        node = self.node(output, "ConvTranspose" if transposed else "Conv")
        bias = self.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return self.tensor(node.input[1]), bias

    def gru(self, output: str) -> GruWeights:
        """The GRU node whose first output is ``output``, converted to torch layout."""
        node = self.node(output, "GRU")
        w = self.tensors[node.input[1]][0]
        r = self.tensors[node.input[2]][0]
        b = self.tensors[node.input[3]][0]
        hidden = r.shape[1]
        to_t = lambda a: torch.from_numpy(
            np.ascontiguousarray(_onnx_to_torch_gates(a, hidden), dtype=np.float32)
        )
        return GruWeights(w_ih=to_t(w), w_hh=to_t(r), b_ih=to_t(b[: 3 * hidden]), b_hh=to_t(b[3 * hidden :]))
