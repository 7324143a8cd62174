"""The target a model is measured on: a runtime (onnxruntime or OpenVINO) and, for onnxruntime,
an execution provider; and one handle on "a compiled model you can run" for either.

``open_runtime(path, runtime, ep, threads)`` returns an object with ``inputs`` and ``outputs``
(names, in the model's order) and ``run(output_names, feeds) -> [arrays]`` (``None`` for every
output), so the latency worker, the accuracy runner and the throughput mode time and evaluate
the same way on every target.

onnxruntime: the session of ``deployopt.core.session`` (intra-op threads as given, one inter-op
thread, sequential) with the named execution provider. A built-in provider is named as
onnxruntime lists it (``CPUExecutionProvider``); a plugin EP library is ``NAME=PATH``: the library
is registered with ``onnxruntime.register_execution_provider_library`` and the session runs on
the devices ``onnxruntime.get_ep_devices()`` lists for NAME.

OpenVINO: ``Core().read_model`` on the ONNX file, compiled for its CPU device with
``INFERENCE_NUM_THREADS`` = threads, one stream, the latency hint. A float model is compiled with
``INFERENCE_PRECISION_HINT`` f32: on a CPU with bf16 support OpenVINO would otherwise run fp32
graphs in bf16, and the numbers would belong to another model. An int8 (Q/DQ) model keeps the
default precision, which is what lets OpenVINO run its int8 kernels.

A target that is not available is bad input before anything runs (``check_target``): a runtime
whose package is missing names the extra to install, an unknown EP lists the EPs there are. There
is never a silent fallback to another target.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

from deployopt.core.errors import UserError, WorkFailed, one_line
from deployopt.core.session import CPU, open_session, session_options

RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_EP = CPU[0]
#: The OpenVINO device deployopt compiles for (a CPU deployment optimizer).
OPENVINO_DEVICE = "CPU"
#: Ops whose presence makes a graph an int8 model for OpenVINO's precision choice.
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                            "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})
_registered: dict[str, str] = {}  # plugin EP name -> library path registered in this process


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a model runs: ``runtime`` and, for onnxruntime, the execution provider ``ep``."""

    runtime: str = "onnxruntime"
    ep: str | None = None  # onnxruntime only: a provider name or NAME=LIBRARY for a plugin EP

    @property
    def ep_name(self) -> str:
        """The EP (onnxruntime) or device (OpenVINO) the model runs on."""
        if self.runtime == "openvino":
            return OPENVINO_DEVICE
        return (self.ep or DEFAULT_EP).partition("=")[0]

    @property
    def label(self) -> str:
        """Short display name: ``onnxruntime`` (CPU EP), ``onnxruntime/NAME``, ``openvino``."""
        if self.runtime == "onnxruntime" and self.ep_name != DEFAULT_EP:
            return f"onnxruntime/{self.ep_name}"
        return self.runtime

    def stamp(self) -> dict:
        """{runtime, runtime_version, ep}: what a number was measured with."""
        return {"runtime": self.runtime, "runtime_version": runtime_version(self.runtime), "ep": self.ep_name}


def runtime_version(runtime: str) -> str | None:
    """The installed version of a runtime's package (None when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(runtime)
    except metadata.PackageNotFoundError:
        return None


def available_eps() -> list[str]:
    """The execution providers onnxruntime can run here: its built-in providers and the EPs of
    registered plugin libraries (``onnxruntime.get_ep_devices``)."""
    import onnxruntime as ort

    names = list(ort.get_available_providers())
    for device in _ep_devices():
        if device.ep_name not in names:
            names.append(device.ep_name)
    return names


def _ep_devices() -> list:
    import onnxruntime as ort

    get = getattr(ort, "get_ep_devices", None)  # the plugin-EP API (onnxruntime >= 1.22)
    return list(get()) if get is not None else []


def _import_openvino(key: str):
    try:
        import openvino
    except ImportError as e:
        raise UserError(f"{key} openvino: the openvino package is not installed "
                        f"({one_line(e)}); pip install 'deployopt[openvino]'") from None
    return openvino


def _register_plugin(name: str, library: str, key: str) -> None:
    """Register a plugin EP library once per process (each worker process registers its own)."""
    import onnxruntime as ort

    if _registered.get(name) == library:
        return
    if not pathlib.Path(library).is_file():
        raise UserError(f"{key} {name}={library}: no such EP library file")
    register = getattr(ort, "register_execution_provider_library", None)
    if register is None:
        raise UserError(f"{key} {name}={library}: onnxruntime {ort.__version__} cannot load plugin EP "
                        "libraries (needs onnxruntime >= 1.22)")
    try:
        register(name, library)
    except Exception as e:  # onnxruntime's own exception types
        raise UserError(f"{key} {name}={library}: onnxruntime cannot register the library: {one_line(e)}") from e
    _registered[name] = library


def check_target(runtime: str = "onnxruntime", ep: str | None = None, *, key: str = "--runtime",
                 ep_key: str = "--ep") -> Target:
    """The target, or a UserError naming ``key``/``ep_key`` when it is not available here."""
    if runtime not in RUNTIMES:
        raise UserError(f"{key}: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        if ep is not None and ep != DEFAULT_EP:
            raise UserError(f"{ep_key} {ep}: execution providers are onnxruntime's; openvino runs on its "
                            f"{OPENVINO_DEVICE} device")
        _import_openvino(key)
        return Target("openvino", None)
    if ep is None or ep == DEFAULT_EP:
        return Target("onnxruntime", None)
    name, sep, library = ep.partition("=")
    if sep:
        _register_plugin(name, library, ep_key)
    available = available_eps()
    if name not in available:
        hint = "; a plugin EP library is given as NAME=PATH" if not sep else ""
        raise UserError(f"{ep_key} {name}: not an execution provider onnxruntime has here "
                        f"(available: {', '.join(available)}){hint}")
    return Target("onnxruntime", ep)


def as_target(target: Target | Sequence | str | None) -> Target:
    """A Target from a Target, a (runtime, ep) pair, a runtime name or None (the default)."""
    if target is None:
        return Target()
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return Target(target, None)
    runtime, ep = target
    return Target(runtime, ep)


def recorded_options(target: Target, threads, optimization_level: str) -> dict:
    """How the target was set up, as plain data for results that say how they were measured."""
    from deployopt.core.session import recorded_options as ort_options

    if target.runtime == "openvino":
        return {"runtime": "openvino", "device": OPENVINO_DEVICE, "INFERENCE_NUM_THREADS": list(threads),
                "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32 for float models, default for int8 (Q/DQ) models",
                # Keys the latency table's footer reads, in OpenVINO's terms.
                "inter_op_num_threads": 1, "execution_mode": "1 stream", "graph_optimization_level":
                "OpenVINO CPU plugin"}
    options = ort_options(threads, optimization_level)
    options["providers"] = [target.ep_name] if target.ep_name != DEFAULT_EP else list(CPU)
    return options


# -- running a model ----------------------------------------------------------------------------

class OrtModel:
    """An onnxruntime session as a runnable model (``session`` is the session itself)."""

    def __init__(self, session):
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self.run = session.run  # bound directly: nothing between the timing loop and onnxruntime


class OpenVinoModel:
    """An OpenVINO compiled model with one infer request; ``run`` returns copies of the outputs
    (the request reuses its output buffers on the next run)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.inputs = [p.get_any_name() for p in compiled.inputs]
        self.outputs = [p.get_any_name() for p in compiled.outputs]
        self._ports = {name: port for port in compiled.outputs for name in port.get_names()}

    def run(self, output_names, feeds):
        result = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        names = self.outputs if output_names is None else output_names
        return [result[self._ports[name]] for name in names]


def is_quantized(path: str | os.PathLike) -> bool:
    """Whether the ONNX file holds int8 ops (Q/DQ or QLinear/Integer ops) in its main graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in _QUANTIZED_OPS for n in proto.graph.node)


def openvino_config(threads: int, quantized: bool) -> dict:
    """The CPU compile settings (module doc)."""
    config = {"INFERENCE_NUM_THREADS": max(1, int(threads)), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if not quantized:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def open_runtime(model: str | os.PathLike, runtime: str | Target = "onnxruntime", ep: str | None = None, *,
                 threads: int = 1, optimization_level: str = "all", what: str | None = None):
    """A runnable compiled model of the ONNX file ``model`` on the target (module doc).

    Raises UserError for a target that is not available and WorkFailed, naming ``what`` (default
    the path), when the runtime cannot load or compile the model.
    """
    target = runtime if isinstance(runtime, Target) else Target(runtime, ep)
    target = check_target(target.runtime, target.ep, key="runtime", ep_key="ep")
    what = what or str(model)
    if target.runtime == "openvino":
        ov = _import_openvino("runtime")
        try:
            core = ov.Core()
            compiled = core.compile_model(core.read_model(str(model)), OPENVINO_DEVICE,
                                          openvino_config(threads, is_quantized(model)))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise WorkFailed(f"openvino cannot load {what}: {one_line(e)}") from e
        return OpenVinoModel(compiled)
    name = target.ep_name
    if "=" in (target.ep or ""):  # a plugin EP: the session runs on the devices its library provides
        devices = [d for d in _ep_devices() if d.ep_name == name]
        if not devices:
            raise UserError(f"ep {target.ep}: the library provides no device onnxruntime found here")
        options = session_options(threads, optimization_level)
        options.add_provider_for_devices(devices, {})
        return OrtModel(open_session(model, options=options, providers=(), what=what))
    # Nodes a non-CPU provider cannot run go to the CPU provider, as onnxruntime always places them.
    providers = [name] if name == DEFAULT_EP else [name, DEFAULT_EP]
    return OrtModel(open_session(model, threads=threads, optimization_level=optimization_level,
                                 providers=providers, what=what))
