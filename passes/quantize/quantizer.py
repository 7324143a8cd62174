"""QDQ insertion by onnxruntime's ``quantize_static``, repeatable for every trial.

Every quantized tensor is stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read back as
``x' = s (q - z)``. The ranges come from a calibration cache, so fallback and latency trials
re-quantize with more nodes in float without re-calibrating; each result's integer weights and
biases are then refined (refine.py) against float statistics collected once. onnxruntime's
quantizer round-trips the model through temporary folders: they go in the folder of the result.

onnxruntime's quantizer also puts a Q/DQ pair on every graph output. Where a Gemm or MatMul
writes the output (a classifier's logits), that pair only rounds the result the user reads:
onnxruntime's QGemm and MatMulIntegerToFloat take int8 inputs and write float, so the pair buys
no speed. Measured on deployopt's int8 real-weight ImageNet models, the same model with and
without the pair (440 held-out crops, onnxruntime's kernels): MobileNetV2's logits were rounded
to steps of 0.15, and without that rounding agreement with fp32 rises 92.7% -> 93.2% (KL 0.0186
-> 0.0177); EfficientNet-Lite0 96.8% -> 97.3% (KL 0.0027 -> 0.0024), and on photos no
calibration saw 87.9% -> 90.9%. Where a Softmax or Sigmoid writes the output (probabilities, a
detector's scores), the uint8 grid is worse still: a step of 1/255 zeroes most of a 1000-class
softmax (on EfficientNet-Lite0's fp32 probabilities alone it costs KL 2.4 and ties the top class
on 1.6% of the crops), and those ops cost little in float at the end of a graph.
``float_outputs`` takes such pairs away. Written by hand: onnxruntime's own switch,
``OpTypesToExcludeOutputQuantization``, works per op type across the whole graph, so it would
also leave unquantized the outputs of inner Gemms, MatMuls and Sigmoids (a squeeze-excite gate).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import onnx
from onnxruntime.quantization import QuantType, quantize_static

from deployopt.core.contain import confined
from deployopt.core.errors import WorkFailed, one_line
from deployopt.passes.quantize.refine import Refiner
from deployopt.passes.quantize.report import FLOAT_OUTPUT_OPS, LAYOUT_OPS, SCORE_OPS
from deployopt.passes.quantize.step_times import StepTimes

#: Setting values -> onnxruntime's integer types.
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


@dataclasses.dataclass
class Quantizer:
    """QDQ models of one pre-processed float model, calibrated once, with chosen nodes in float."""

    float_path: pathlib.Path  # the pre-processed float model
    cache: pathlib.Path  # calibration ranges (save_tensors_data)
    options: dict[str, Any]  # quantize_static's format arguments (QDQ, types, per-channel, ...)
    times: StepTimes
    refiner: Refiner | None = None
    float_nodes: list[str] = dataclasses.field(default_factory=list)  # always kept float
    #: The refinement summary of every model made, by path (shared by ``keeping_float`` copies).
    refinements: dict[pathlib.Path, dict] = dataclasses.field(default_factory=dict)

    def __call__(self, float_nodes: Sequence[str], path: pathlib.Path) -> pathlib.Path:
        """Quantize with ``float_nodes`` (beyond ``self.float_nodes``) in float into ``path``."""
        with self.times("quantize"), confined(path.parent):
            try:
                quantize_static(str(self.float_path), str(path), calibration_data_reader=None,
                                calibration_cache_path=str(self.cache),
                                nodes_to_exclude=[*self.float_nodes, *float_nodes], **self.options)
            except Exception as e:  # onnxruntime raises whatever its quantizer hits
                raise WorkFailed(f"onnxruntime quantize_static failed: {one_line(e, with_type=True)}") from e
            float_outputs(path)
        if self.refiner is not None:
            with self.times("refine"):
                self.refinements[path] = self.refiner(path)
        return path

    def keeping_float(self, nodes: Sequence[str]) -> Quantizer:
        """The same quantizer with ``nodes`` also always in float."""
        return dataclasses.replace(self, float_nodes=[*self.float_nodes, *nodes])


def float_outputs(path: pathlib.Path) -> list[str]:
    """Take the Q/DQ pairs off the end of each graph output's chain in the QDQ model at ``path``
    (module doc), in place; the names of the outputs that changed.

    Walking back from an output, each step is a pair ``x -> Q -> DQ -> t`` whose tensors nobody
    else reads, written by a score op (Softmax, LogSoftmax, Sigmoid), a layout op (Reshape,
    Transpose, ...), or a Gemm/MatMul, where the walk stops. The pairs up to the last score op
    or Gemm/MatMul on that walk go: each producer then writes ``t`` itself, so the graph's
    interface is unchanged. Layout ops alone (after a Conv, say) keep their pairs: moving the
    rounding would change nothing."""
    proto = onnx.load(str(path))
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = collections.Counter(i for n in graph.node for i in n.input)
    dropped, names = set(), []
    for output in graph.output:
        chain, tensor, expected_readers = [], output.name, 0
        while readers[tensor] == expected_readers:
            dq = producer.get(tensor)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if (source is None or readers[dq.input[0]] != 1 or readers[q.input[0]] != 1
                    or source.op_type not in FLOAT_OUTPUT_OPS | SCORE_OPS | LAYOUT_OPS):
                break
            chain.append((q, dq, source, tensor))
            if source.op_type in FLOAT_OUTPUT_OPS:
                break
            tensor, expected_readers = source.input[0], 1
        ends = [i for i, (_, _, source, _) in enumerate(chain) if source.op_type not in LAYOUT_OPS]
        if not ends:
            continue
        for q, dq, source, read in chain[:ends[-1] + 1]:  # ``read``: the tensor the DQ wrote
            source.output[list(source.output).index(q.input[0])] = read
            dropped.update((id(q), id(dq)))
        names.append(output.name)
    if names:
        kept = [n for n in graph.node if id(n) not in dropped]
        freed = {i for n in graph.node if id(n) in dropped for i in n.input} - {i for n in kept for i in n.input}
        del graph.node[:]
        graph.node.extend(kept)
        # the pairs' scales and zero points, unread now (onnxruntime warns about each one it finds)
        unread = [t for t in graph.initializer if t.name in freed]
        for tensor in unread:
            graph.initializer.remove(tensor)
        onnx.save(proto, str(path))
    return names
