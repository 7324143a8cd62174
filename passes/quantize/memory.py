"""How much memory a quantize run needs, estimated before any work, against ``max_memory_mb``.

Every stage of the pass keeps running statistics (ranges, histograms, Hessian sums, SQNR sums),
so what it holds at once is one run of onnxruntime on a few samples plus those statistics, never
the intermediate outputs of all samples. The peak is the largest stage on top of what the
process already holds:

    peak ≈ rss_now + TOOLING_MB + WEIGHT_COPIES · W + max_stage S_stage

with ``A`` the bytes of all float activation tensors of one sample (shape inference at the
data's input shape, batch 1), ``W`` the weight bytes and ``n`` the samples of one session run:

- calibration, minmax: the augmented model returns per-tensor min/max only,
  ``S = RUN_FACTOR · A · n``; histogram methods (percentile, entropy, distribution) keep every
  calibrated output of a chunk of ``c`` samples and stack it once more:
  ``S = (RUN_FACTOR + HISTOGRAM_COPIES) · A · c``;
- refinement: one run exposing the layer inputs, ``S = RUN_FACTOR · A · n + Σ G K² · 8`` (the
  float64 Hessian sums of the GPTQ layers);
- SQNR: the float and the quantized model run once per group of tensors, each run returning
  only its group's tensors (the quantized ones before and after their Q/DQ pair), at most
  ``g = min(SQNR_GROUP_MB, budget / 8)`` per run:
  ``S = A · n_sqnr + SQNR_FACTOR · min(g, SQNR_EXPOSED · A · n_sqnr)`` (the sessions run without
  onnxruntime's arena, so a run holds at most its live tensors besides the group's);
- sensitivity, latency trials: one run each, below the SQNR stage.

The factors were fitted on the peaks that deployopt.measure.memory.RssSampler recorded per stage
on a 640x640 segmentation net, an 800x608 detector and small classifiers; the estimate is meant
to be within a factor of 1.5 of the measured peak. It does not count the pages of a memory-mapped
``.npy`` dataset that the run reads (resident while it is mapped, up to the file's size).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import psutil

from deployopt.core.errors import UserError
from deployopt.measure.memory import current_rss_mb
from deployopt.passes.quantize.cpu import conv_group

MB = 1024 * 1024
#: Bytes a session run holds per activation byte (the tensors, onnxruntime's arena, which grows
#: in powers of two, the copies handed to numpy).
RUN_FACTOR = 3.3
#: Extra copies of a chunk's outputs a histogram calibrator makes (np.asarray, flatten).
HISTOGRAM_COPIES = 2.0
#: SQNR: bytes held per byte of the tensors one run of a group returns (onnxruntime's buffers and
#: the arrays handed to numpy).
SQNR_FACTOR = 2.0
#: SQNR: the tensors returned over all groups per activation byte (float, and the quantized
#: model's before and after its Q/DQ pair).
SQNR_EXPOSED = 3.0
#: SQNR: a group's tensors per run stay under this many MiB, and under this share of the budget.
#: Every group is one more run of both models, so fewer, larger groups are faster: measured on the
#: 800x608 layout detector (2 samples), 256 MiB took 21.5 s in 18 groups and 1024 MiB 11.5 s, with
#: the stage's peak (1.6 GB) still below calibration's (2.2 GB).
SQNR_GROUP_MB = 1024.0
SQNR_GROUP_SHARE = 1 / 8
#: The SQNR stage runs fewer samples at once than ``Workload.sqnr_samples`` when that keeps a
#: run under this many MiB (one run, or one fixed batch, at the least).
SQNR_RUN_MB = 1024.0
#: What the quantization tooling adds whatever the model (onnxruntime sessions and their
#: kernels, shape inference, the quantizer's model copies), MiB.
TOOLING_MB = 150.0
#: Copies of the weights alive at once (float, pre-processed and quantized protos, sessions).
WEIGHT_COPIES = 8.0
#: The default ``max_memory_mb``: this share of the memory available when the pass starts.
DEFAULT_SHARE = 0.75
HISTOGRAM_METHODS = ("percentile", "entropy", "distribution")


def default_budget_mb() -> float:
    """``DEFAULT_SHARE`` of the memory available now (psutil), in MiB."""
    return DEFAULT_SHARE * psutil.virtual_memory().available / MB


def sqnr_group_mb(budget_mb: float) -> float:
    """The most MiB of tensors one run of the SQNR models returns (sqnr.py splits them into
    groups): ``min(SQNR_GROUP_MB, SQNR_GROUP_SHARE · budget)``."""
    return min(SQNR_GROUP_MB, SQNR_GROUP_SHARE * budget_mb)


def _elem_bytes(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def tensor_bytes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """``({tensor: bytes}, unknown)``: the bytes of every float tensor a node produces for one run
    at ``shapes`` (input name -> shape), and how many such tensors have no static shape (left
    out). Shape inference runs on a copy whose inputs are fixed to those shapes."""
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    del graph.value_info[:]
    for value in graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape
            del dims.dim[:]
            for d in shapes[value.name]:
                dims.dim.add().dim_value = int(d)
    model = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # a graph onnx cannot infer (custom domains): graph outputs only
        inferred = graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    produced = {o for n in proto.graph.node for o in n.output}
    sizes: dict[str, int] = {}
    unknown = 0
    for value in [*inferred.value_info, *inferred.output]:
        t = value.type.tensor_type
        if value.name not in produced or t.elem_type not in floats:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not t.HasField("shape") or any(d is None for d in dims):
            unknown += 1
            continue
        sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * _elem_bytes(t.elem_type)
    return sizes, unknown


def activation_bytes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """``(A, unknown)``: the total of ``tensor_bytes`` and how many tensors it could not size."""
    sizes, unknown = tensor_bytes(proto, shapes)
    return sum(sizes.values()), unknown


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the initializers and Constant-node tensors."""
    total = sum(int(np.prod(t.dims, dtype=np.int64)) * _elem_bytes(t.data_type) for t in proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += int(np.prod(a.t.dims, dtype=np.int64)) * _elem_bytes(a.t.data_type)
    return total


def hessian_bytes(proto: onnx.ModelProto, max_columns: int) -> int:
    """float64 ``G x K x K`` sums of every Conv/Gemm/MatMul whose weight GPTQ would round."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    total = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        w = shapes[node.input[1]]
        if node.op_type == "Conv" and len(w) >= 3:
            group = conv_group(node)
            k = int(np.prod(w[1:]))
        elif len(w) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            group, k = 1, int(w[1] if node.op_type == "Gemm" and trans_b else w[0])
        else:
            continue
        if k <= max_columns:
            total += group * k * k * 8
    return total


@dataclasses.dataclass
class Estimate:
    """The estimated peak of a run, by stage, and the calibration chunk it was computed for."""

    process_mb: float  # the process when the estimate was made
    base_mb: float  # that, plus the tooling and the weight copies
    stages_mb: dict[str, float]
    chunk_samples: int
    sqnr_samples: int  # samples per run of the SQNR models
    sqnr_group_mb: float  # exposed tensors per run of the SQNR models, MiB at most
    activation_mb_per_sample: float
    unknown_tensors: int

    @property
    def total_mb(self) -> float:
        return self.base_mb + max(self.stages_mb.values(), default=0.0)

    def to_json(self, budget_mb: float) -> dict:
        return {"budget_mb": round(budget_mb), "estimate_mb": round(self.total_mb),
                "process_at_start_mb": round(self.process_mb), "base_mb": round(self.base_mb),
                "stages_mb": {k: round(v) for k, v in self.stages_mb.items()},
                "activation_mb_per_sample": round(self.activation_mb_per_sample, 1),
                "calibration_chunk_samples": self.chunk_samples, "sqnr_run_samples": self.sqnr_samples,
                "sqnr_group_mb": round(self.sqnr_group_mb),
                **({"tensors_without_shape": self.unknown_tensors} if self.unknown_tensors else {})}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the pass will run: samples per session run of each stage, and the calibration."""

    method: str
    run_samples: int  # samples per session run (the batch, or the model's fixed batch)
    batch_size: int  # the largest calibration chunk wanted
    sqnr_samples: int  # samples per run of the SQNR models wanted
    fixed_batch: bool  # the model takes exactly run_samples per run
    refine: bool
    max_columns: int


def estimate(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], work: Workload, budget_mb: float,
             *, samples_per_shape: int = 1) -> Estimate:
    """The run's estimated peak (module doc); ``shapes`` are the input shapes of one feed of
    ``samples_per_shape`` samples. Histogram calibration gets the largest chunk, at most
    ``work.batch_size`` samples and at least one run, whose estimate fits ``budget_mb``."""
    act, unknown = activation_bytes(proto, shapes)
    a = act / MB / max(samples_per_shape, 1)
    now = current_rss_mb() or 0.0
    base = now + TOOLING_MB + WEIGHT_COPIES * weight_bytes(proto) / MB
    per_run = RUN_FACTOR * a
    sqnr = work.sqnr_samples
    if not work.fixed_batch:
        sqnr = max(1, min(sqnr, int(SQNR_RUN_MB // max(per_run, 1e-9))))
    group = sqnr_group_mb(budget_mb)
    stages = {"sqnr": a * sqnr + SQNR_FACTOR * min(group, SQNR_EXPOSED * a * sqnr)}
    if work.refine:
        stages["refine"] = RUN_FACTOR * a * work.run_samples + hessian_bytes(proto, work.max_columns) / MB
    chunk = max(work.batch_size, work.run_samples)
    if work.method in HISTOGRAM_METHODS:
        per_sample = (RUN_FACTOR + HISTOGRAM_COPIES) * a
        room = budget_mb - base - max(stages.values())
        fits = int(room // per_sample) if per_sample > 0 else chunk
        # whole session runs only: a chunk is a list of feeds
        chunk = max(work.run_samples, min(chunk, fits // work.run_samples * work.run_samples))
        stages["calibration"] = per_sample * chunk
    else:
        stages["calibration"] = RUN_FACTOR * a * work.run_samples
    return Estimate(now, base, stages, chunk, sqnr, group, a, unknown)


def check_budget(est: Estimate, budget_mb: float) -> None:
    """Refuse a run whose estimate exceeds the budget, naming the setting and what lowers it."""
    if est.total_mb > budget_mb:
        raise UserError(f"max_memory_mb: the run needs about {est.total_mb:,.0f} MB, more than the "
                        f"{budget_mb:,.0f} MB allowed; raise it or lower batch_size")
