"""The GenAI builder's pre-quantized path (``--int4-algo gptq``) without its whole-graph copy.

Run inside the builder's child process (kvant.export.onnx_pipeline): `lean_prequantized()`
before `create_model`.

Why by hand: the builder (0.18) quantizes what is left in float after its graph is built by
converting the whole graph to one protobuf (`ir.to_proto`) for ONNX Runtime's
MatMulNBitsQuantizer, then back. From a GPTQ checkpoint only the lm_head is left, but the
round trip copies every int4 weight: measured at real width, 423 MiB per layer (about three
copies of its int4 bytes) and 23.7 GiB for the builder at 40 layers. Here each float MatMul
left is quantized in the builder's own graph by ONNX Runtime's DefaultWeightOnlyQuantizer
(the MLAS kernel and the MatMulNBits node its DEFAULT route writes: the same bytes), and the
builder's `ir.save` streams every tensor to the external data file as before: 300 MiB per
layer, 15.0 GiB at 40 (docs/formats.md, "ONNX int4 of the 11.4B model from the GPTQ
artifact").
"""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
)
from onnxruntime.quantization.quant_utils import QuantFormat
from onnxruntime_genai.models import builder

# the builder imports its parts as top-level modules (`builders.base`, from its folder put on
# sys.path), so its classes are those, not onnxruntime_genai.models.builders.base's
Model = builder.Model


def quantize_float_matmuls(model: Model) -> ir.Model:
    """The builder's graph with each MatMul that still has a float weight made MatMulNBits
    (its bits from the builder's per-node config, e.g. 8 for the lm_head, else the body's),
    in place: no copy of the other initializers. Each one is named on stdout
    (`KVANT_IN_PLACE <node>`, which kvant.export.onnx_pipeline.build records)."""
    graph = model.model.graph
    attrs = model.quant_attrs
    per_node = getattr(model, "int4_customized_weight_config", {}) or {}
    excluded = set(attrs["nodes_to_exclude"])
    for node in [n for n in graph if n.op_type == "MatMul" and n.domain == ""]:
        weight = node.inputs[1]
        if node.name in excluded or weight is None or weight.const_value is None:
            continue
        array = weight.const_value.numpy()
        if array.ndim != 2:
            continue  # as ONNX Runtime's quantizer: 2-D weights only
        bits = per_node.get(node.name, {}).get("bits", attrs["bits"])
        config = DefaultWeightOnlyQuantConfig(
            block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
            accuracy_level=attrs["accuracy_level"], quant_format=QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",), bits=bits)
        rows, cols = array.shape
        packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
            np.ascontiguousarray(array, dtype=np.float32))
        del array
        inputs = [node.inputs[0], _initializer(graph, f"{weight.name}_Q{bits}", packed),
                  _initializer(graph, f"{weight.name}_scales", scales)]
        if not attrs["is_symmetric"]:
            inputs.append(_initializer(graph, f"{weight.name}_zero_points", zero_points))
        named = {"K": rows, "N": cols, "bits": bits, "block_size": attrs["matmul_block_size"]}
        if attrs["accuracy_level"]:  # left out at 0, as ONNX Runtime's quantizer does
            named["accuracy_level"] = attrs["accuracy_level"]
        nbits = ir.node("MatMulNBits", inputs, domain="com.microsoft", name=f"{node.name}_Q{bits}",
                        attributes=dict(sorted(named.items())))  # onnx.helper's order
        ir.convenience.replace_nodes_and_values(graph, node, [node], [nbits], node.outputs,
                                                nbits.outputs)
        graph.initializers.pop(weight.name)
        sys.stdout.write(f"KVANT_IN_PLACE {node.name}\n")  # to the parent, not a log
    return model.model


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def lean_prequantized() -> None:
    """Make the builder quantize a pre-quantized checkpoint's float MatMuls in place (its
    other routes, where the whole graph is float until the quantizer runs, are unchanged)."""
    whole_graph = Model.to_nbits

    def to_nbits(self) -> ir.Model:
        prepacked = self.ep == "cuda" and self.matmul_attrs.get("weights_prepacked", 0) > 0
        if self.quant_type is None or self.quant_attrs.get("use_qdq") or prepacked \
                or getattr(self, "exact_quant_overrides", None):
            return whole_graph(self)
        return quantize_float_matmuls(self)

    Model.to_nbits = to_nbits
