"""Latency-aware quantization: the min-cut placement (exact against brute force), profile
attribution, and the pass's decisions with synthetic timings injected through ``QuantizePass.probe``
(deterministic), plus one smoke test on real onnxruntime timings with a generous margin."""

from __future__ import annotations

import io
import itertools
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deployopt.passes.context import PassContext
from deployopt.core.data import ArrayDataset
from deployopt.passes.quantize import latency_search
from deployopt.passes.quantize.cost_model import CostModel, Graph
from deployopt.passes.quantize.latency_probe import LatencyProbe, NodeCosts, Timing, node_costs
from deployopt.passes.quantize import QuantizePass
from deployopt.passes.quantize.report import FLOAT_OUTPUT_OPS
from tests._fixtures import train_classifier

N_TRAIN = 1400
QDQ = ("QuantizeLinear", "DequantizeLinear")


# -- fixtures -------------------------------------------------------------------------------------
class GatedDigits(nn.Module):
    """conv3x3 -> ReLU -> x * sigmoid(conv1x1(x)), twice (the second conv strided), then a linear
    classifier: the Sigmoid and Mul gates are the ops the fake probe makes slow in int8."""

    def __init__(self):
        super().__init__()
        self.conv1, self.gate1 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.conv2, self.gate2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = x * torch.sigmoid(self.gate1(x))
        x = torch.relu(self.conv2(x))
        x = x * torch.sigmoid(self.gate2(x))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def gated_proto(digits):
    """GatedDigits trained 12 epochs on 1,400 digits, TorchScript export."""
    x, y = digits
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = GatedDigits()
    train_classifier(net, x[:N_TRAIN], y[:N_TRAIN], epochs=12)
    net.eval()
    with torch.no_grad():
        assert (net(torch.from_numpy(x[N_TRAIN:])).argmax(1).numpy() == y[N_TRAIN:]).mean() > 0.9
    buf = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


# -- a probe with synthetic timings ----------------------------------------------------------------
class FakeProbe(LatencyProbe):
    """Latency of a model = sum of per-node costs by mode (int8 when the node sits between
    DequantizeLinear and QuantizeLinear, as onnxruntime's fusions need) + CONVERSION_MS per
    standalone Q/DQ kernel; profiles report the same
    numbers per node. Deterministic, so the decisions under test do not depend on a busy host."""

    CONVERSION_MS = 0.05

    def __init__(self, float_ms: dict, int8_ms: dict, default: float = 0.01, scale: float = 1.0):
        self.float_ms, self.int8_ms, self.default, self.scale = float_ms, int8_ms, default, scale
        self.calls: list[str] = []

    def _costs(self, proto: onnx.ModelProto) -> NodeCosts:
        inits = {t.name for t in proto.graph.initializer}
        dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        producer = {o: n for n in proto.graph.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in proto.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        # a node unit DQ -> op -> Q is an int8 kernel (a Gemm/MatMul also without the Q: its int8
        # kernel writes float); a node missing either side runs float
        int8 = {n.name for n in proto.graph.node if n.op_type not in QDQ
                and (acts := [i for i in n.input if i and i not in inits]) and all(i in dq_out for i in acts)
                and (n.op_type in FLOAT_OUTPUT_OPS
                     or all(consumers.get(o) and all(c.op_type == "QuantizeLinear" for c in consumers[o])
                            for o in n.output))}
        nodes = {n.name: (self.int8_ms if n.name in int8 else self.float_ms).get(n.op_type, self.default) * self.scale
                 for n in proto.graph.node if n.op_type not in QDQ}
        outputs = {o.name for o in proto.graph.output}
        q_input = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        conversions = {}
        for n in proto.graph.node:
            if n.op_type == "QuantizeLinear" and (n.input[0] not in producer or producer[n.input[0]].name not in int8):
                conversions[("Q", n.input[0])] = self.CONVERSION_MS * self.scale
            if n.op_type == "DequantizeLinear" and n.input[0] not in inits and (
                    n.output[0] in outputs or any(c.name not in int8 for c in consumers.get(n.output[0], []))):
                conversions[("DQ", q_input.get(n.input[0], n.input[0]))] = self.CONVERSION_MS * self.scale
        total = sum(nodes.values()) + sum(conversions.values())
        return NodeCosts(nodes, conversions, total, 0.0)

    def compare(self, reference, model, feeds, threads):
        self.calls.append("compare")
        ref, mod = (self._costs(onnx.load(str(p))).total_ms for p in (reference, model))
        r = mod / ref
        return Timing(r, (r * 0.99, r * 1.01), ref, mod)

    def profile(self, path, proto, feeds, threads):
        self.calls.append("profile")
        return self._costs(onnx.load(str(path)))


# Float: convolutions dominate, gates are cheap. int8: convolutions 4x faster, but Sigmoid and Mul
# made deliberately slow (no fused int8 kernel on this imaginary CPU).
GATES_SLOW = dict(float_ms={"Conv": 1.0, "Gemm": 0.5, "Sigmoid": 0.05, "Mul": 0.05},
                  int8_ms={"Conv": 0.25, "Gemm": 0.15, "Sigmoid": 1.0, "Mul": 1.0})


def _run(proto, x, probe=None, **settings):
    """The StepResult of one QuantizePass run (model, notes, details)."""
    p = QuantizePass(**settings)
    if probe is not None:
        p.probe = probe
    p.context = PassContext(calibration=ArrayDataset(x[:64]), evaluation=ArrayDataset(x[N_TRAIN:]))
    return p(ir.from_proto(proto))


# -- the pass with synthetic timings ---------------------------------------------------------------
def test_op_type_slow_in_int8_is_excluded_and_convolutions_stay_int8(gated_proto, digits):
    x, _ = digits
    probe = FakeProbe(**GATES_SLOW)
    result = _run(gated_proto, x, probe)
    trials = result.details["latency_trials"]
    first, chosen = trials[0], next(t for t in trials if t.get("chosen"))
    assert first["source"] == "first quantization" and first["latency_ratio"] > 1.0  # plain int8 is slower
    assert chosen["trial"] > 0 and chosen["faster"] and chosen["latency_ratio"] < 0.6
    assert chosen["excluded_op_types"] == {"Sigmoid": 2, "Mul": 2}
    # every trial record carries what the report needs
    for t in trials:
        assert {"excluded", "excluded_nodes", "latency_ratio", "latency_ratio_ci", "agreement", "met",
                "predicted_ratio"} <= set(t)
        low, high = t["latency_ratio_ci"]
        assert low <= t["latency_ratio"] <= high
    assert result.details["latency_aware"]["chosen_trial"] == chosen["trial"]
    # the returned model: convolutions and the classifier int8, the gates float
    assert result.modified
    assert result.details["int8_ops"]["Conv"] == 4 and result.details["int8_ops"]["Gemm"] == 1
    floats = {e["node"]: e for e in result.details["float_nodes"] if e["reason"].startswith("latency")}
    assert sorted(e["op_type"] for e in floats.values()) == ["Mul", "Mul", "Sigmoid", "Sigmoid"]
    assert all(e["reason"] == f"latency: int8 was slower here (latency trial {chosen['trial']})"
               for e in floats.values())
    # the Flatten after the float gate only moves data: the quantizer leaves it float by itself
    assert {e["op_type"] for e in result.details["float_nodes"] if e["node"] not in floats} == {"Flatten"}
    q = ir.to_proto(result.model)
    assert {n.op_type for n in q.graph.node if n.name in floats} == {"Sigmoid", "Mul"}
    assert any(re.fullmatch(rf"latency-aware: trial {chosen['trial']} kept, 4 nodes back to float "
                            r"\(Mul x2, Sigmoid x2\): 0\.\d\dx float latency \[0\.\d\d, 0\.\d\d\]; the first "
                            r"quantization was 1\.\d\dx float latency \[1\.\d\d, 1\.\d\d\]", n) for n in result.notes)
    # the cost model found the gates: they lead the "int8 costs more" list
    losers = {r["op_type"] for r in result.details["latency_aware"]["int8_costs_more"][:4]}
    assert losers == {"Sigmoid", "Mul"}
    assert result.details["latency_aware"]["timing"] == {"warmup": 5, "runs": 30, "rounds": 3, "threads": 1}


def test_float_model_returned_when_no_int8_configuration_pays(gated_proto, digits):
    x, _ = digits
    slow = {op: 2 * ms for op, ms in GATES_SLOW["float_ms"].items()}  # int8 twice as slow everywhere
    model = ir.from_proto(gated_proto)
    p = QuantizePass()
    p.probe = FakeProbe(GATES_SLOW["float_ms"], slow, default=0.01)
    p.context = PassContext(calibration=ArrayDataset(x[:64]))
    result = p(model)
    assert not result.modified and result.model is not model
    out = ir.to_proto(result.model)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in gated_proto.graph.node]
    assert not any(n.op_type in QDQ for n in out.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in gated_proto.graph.initializer}
    assert all(np.array_equal(numpy_helper.to_array(t), inits[t.name]) for t in out.graph.initializer)
    d = result.details
    assert d["latency_aware"]["result"] == "float" and d["latency_aware"]["chosen_trial"] is None
    assert "int8_ops" not in d and "ort_optimized" not in d
    # the kernels of the first quantization stay in the report: every quantized node of
    # GatedDigits fused (4 Conv, 2 Sigmoid, 2 Mul, 1 Gemm), only the graph input's Q left (QGemm
    # writes the float logits)
    first = d["first_quantization_ort_optimized"]
    assert first["fused_int8"] == {"QGemm": 1, "QLinearConv": 4, "QLinearMul": 2, "QLinearSigmoid": 2}
    assert first["fused_int8_total"] == 9
    assert (first["unfused_quantize_linear"], first["unfused_dequantize_linear"]) == (1, 0)
    assert all(not t["faster"] for t in d["latency_trials"])
    assert any(re.fullmatch(r"latency-aware: no int8 configuration was faster than float in \d+ trials? "
                            r"\(best \d\.\d\dx float latency \[\d\.\d\d, \d\.\d\d\]\); the float model is "
                            r"returned unchanged", n) for n in result.notes)


def test_latency_aware_false_keeps_the_old_behaviour(gated_proto, digits):
    x, _ = digits

    class Refuse(LatencyProbe):
        def compare(self, *a):
            raise AssertionError("latency_aware=false must not time anything")

        profile = compare

    result = _run(gated_proto, x, Refuse(), latency_aware=False)
    assert result.modified
    assert "latency_trials" not in result.details and "latency_aware" not in result.details
    assert result.details["int8_ops"] == {"Conv": 4, "Sigmoid": 2, "Mul": 2, "Gemm": 1, "Flatten": 1}
    assert not any(n.startswith("latency-aware") for n in result.notes)


def test_search_skipped_when_first_quantization_is_fast_and_fused(gated_proto, digits):
    x, _ = digits
    fast = {op: ms / 4 for op, ms in GATES_SLOW["float_ms"].items()}
    probe = FakeProbe(GATES_SLOW["float_ms"], fast, default=0.01)
    result = _run(gated_proto, x, probe)
    la = result.details["latency_aware"]
    assert la["searched"] is False and la["result"] == "int8" and la["internal_unfused_qdq"] == 0
    assert len(result.details["latency_trials"]) == 1 and probe.calls == ["compare"]  # no profiles
    assert any(re.fullmatch(r"latency-aware: search skipped, the first quantization is already \d\.\d\dx "
                            r"faster than float \(.*\) with every Q/DQ inside the graph fused", n) for n in result.notes)
    assert result.modified and result.details["int8_ops"]["Sigmoid"] == 2


def test_small_models_are_left_to_the_step_guard(gated_proto, digits):
    x, _ = digits
    probe = FakeProbe(**GATES_SLOW, scale=0.001)  # the same slow int8, but a 5 µs float model
    result = _run(gated_proto, x, probe)
    assert result.details["latency_aware"]["searched"] is False
    assert result.details["latency_trials"][0]["latency_ratio"] > 1.0
    assert result.modified and result.details["int8_ops"]["Conv"] == 4
    assert any(n.startswith("latency-aware: search skipped, the float model runs in 0.005 ms (< latency_min_ms 0.1")
               for n in result.notes)


def test_trials_are_bounded_by_max_trials(gated_proto, digits):
    x, _ = digits
    probe = FakeProbe(**GATES_SLOW)
    result = _run(gated_proto, x, probe, max_trials=2)
    assert len(result.details["latency_trials"]) == 2


@pytest.mark.parametrize("settings, message", [
    ({"latency_aware": "yes"}, "latency_aware: expected bool, got 'yes'"),
    ({"latency_min_ms": -1}, "latency_min_ms: -1 is outside [0, inf)"),
    ({"latency_budget_s": 0}, "latency_budget_s: 0 is outside (0, inf)"),
])
def test_bad_latency_settings(settings, message):
    from deployopt.core.errors import UserError

    with pytest.raises(UserError) as e:
        QuantizePass(**settings)
    assert str(e.value) == message


def test_recipe_keys_and_the_probe_is_not_one():
    from deployopt.core.errors import UserError
    from deployopt.recipe import from_mapping

    raw = {"model": "m.onnx", "passes": [{"quantize": {"latency_aware": False, "max_trials": 4}}]}
    step = from_mapping(raw).passes[0]
    assert step.latency_aware is False and step.max_trials == 4 and step.min_step_speedup == 1.0
    assert "probe" not in step.params() and step.params()["latency_min_ms"] == 0.1
    raw["passes"][0]["quantize"] = {"latency_aware": "no"}
    with pytest.raises(UserError, match=r"^passes\[0\]\.quantize\.latency_aware: expected bool, got 'no'$"):
        from_mapping(raw)
    raw["passes"][0]["quantize"] = {"probe": "fake"}
    with pytest.raises(UserError, match=r"^passes\[0\]\.quantize\.probe: unknown key"):
        from_mapping(raw)


# -- the cost model --------------------------------------------------------------------------------
def _random_model(rng, nodes=7):
    """A DAG of ``nodes`` nodes (each reads 1-2 earlier tensors or the input), random costs."""
    names = [f"n{i}" for i in range(nodes)]
    producer, consumers = {"x": None}, {}
    for i, n in enumerate(names):
        producer[f"t{i}"] = n
        sources = ["x"] + [f"t{j}" for j in range(i)]
        for s in rng.choice(sources, size=min(len(sources), int(rng.integers(1, 3))), replace=False):
            consumers.setdefault(str(s), []).append(n)
    used = {t for t in consumers}
    outputs = [f"t{i}" for i in range(nodes) if f"t{i}" not in used]
    elements = {t: int(rng.integers(1, 5000)) for t in producer}
    graph = Graph({n: "Conv" for n in names}, producer, consumers, outputs, elements)
    capable = [n for n in names if rng.random() < 0.8]
    measured = {(k, t): float(rng.random()) for t in producer for k in ("Q", "DQ") if rng.random() < 0.5}
    return CostModel(graph, frozenset(capable), {n: float(rng.random() * 2) for n in names},
                          {n: float(rng.random() * 2) for n in capable}, measured,
                          {"Q": (0.01, 1e-4), "DQ": (0.02, 2e-4)})


@pytest.mark.parametrize("seed", range(8))
def test_min_cut_is_the_exact_minimum_of_the_cost(seed):
    model = _random_model(np.random.default_rng(seed))
    capable = sorted(model.capable)
    for weight in (1.0, 0.25, 4.0):
        best = min(model.cost([n for n, on in zip(capable, bits) if on], weight)
                   for bits in itertools.product((0, 1), repeat=len(capable)))
        assert model.cost(model.cut(weight), weight) == pytest.approx(best, abs=1e-9)


def test_conversion_costs_decide_the_border():
    """input -> a -> b -> c -> output; b cannot run int8. int8 saves 1.0 ms on a and on c; each
    standalone conversion costs 0.3 (a's output DQ, c's input Q, the input's Q, the output's DQ)."""
    g = Graph({"a": "Conv", "b": "PRelu", "c": "Conv"},
                   {"x": None, "ta": "a", "tb": "b", "tc": "c"},
                   {"x": ["a"], "ta": ["b"], "tb": ["c"]}, ["tc"], {t: 1000 for t in ("x", "ta", "tb", "tc")})
    measured = {(k, t): 0.3 for t in ("x", "ta", "tb", "tc") for k in ("Q", "DQ")}
    model = CostModel(g, frozenset({"a", "c"}), {"a": 1.5, "b": 0.1, "c": 1.5}, {"a": 0.5, "c": 0.5},
                           measured, {"Q": (0.0, 0.0), "DQ": (0.0, 0.0)})
    assert model.cut(1.0) == {"a", "c"}  # saves 1.0 per node for 0.6 of conversions each
    assert model.cut(2.0) == set()  # conversions at 0.6: 1.2 per node > 1.0 saved
    assert model.cost({"a", "c"}) == pytest.approx(0.5 + 0.1 + 0.5 + 4 * 0.3)
    assert model.cost(()) == pytest.approx(3.1)


def test_profile_rows_are_attributed_to_nodes_and_conversions():
    """x -Q-DQ-> conv (weight DQ) -Q-DQ-> prelu -Q-DQ-> conv2 -> y."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.int8), "w_q")
    s = numpy_helper.from_array(np.float32(0.1), "s")
    z = numpy_helper.from_array(np.uint8(0), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="x_DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "s"], ["w"], name="w_DQ"),
             helper.make_node("Conv", ["x_dq", "w"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["c_q"], name="c_Q"),
             helper.make_node("DequantizeLinear", ["c_q", "s", "z"], ["c_dq"], name="c_DQ"),
             helper.make_node("PRelu", ["c_dq", "s"], ["p"], name="prelu"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, s, z])
    proto = helper.make_model(graph)
    rows = [("QuantizeLinear", ["x_Q"], 0.02),  # the input's standalone Q
            ("QLinearConv", ["conv", "x_DQ", "w_DQ", "c_Q"], 0.5),  # fused: all of it is the conv's
            ("DequantizeLinear", ["c_DQ"], 0.03),  # standalone DQ in front of the float PRelu
            ("PRelu", ["prelu"], 0.1),
            ("DequantizeLinear", ["w_DQ"], 0.04),  # a weight dequantized at run time: conv2 pays
            ("Conv", ["conv2"], 0.2),
            ("Transpose", [], 0.01)]  # inserted by onnxruntime
    costs = node_costs(rows, proto)
    # the inserted Transpose is charged to the convolutions in proportion to their time
    assert costs.nodes == pytest.approx({"conv": 0.52 + 0.01 * 0.52 / 0.74, "prelu": 0.1,
                                         "conv2": 0.22 + 0.01 * 0.22 / 0.74})
    assert costs.conversions == pytest.approx({("Q", "x"): 0.02, ("DQ", "c"): 0.03})
    assert costs.total_ms == pytest.approx(0.9) and costs.unattributed_ms == pytest.approx(0.01)


# -- real timings ----------------------------------------------------------------------------------
def _hardswish_chain(rng, layers=6, channels=16, size=64) -> onnx.ModelProto:
    """A 1x1 convolution, then depthwise 3x3 convolutions, each followed by HardSwish (no int8
    kernel: onnxruntime runs it as HardSigmoid + QLinearMul between Q/DQ pairs). The depthwise
    convolutions are too cheap to pay for those conversions: plain int8 is slower than float."""
    nodes, inits, prev = [], [], "input"
    for i in range(layers):
        if i == 0:
            w = rng.standard_normal((channels, 3, 1, 1)).astype(np.float32) * 0.5
            nodes.append(helper.make_node("Conv", [prev, "w0"], ["c0"], name="conv0"))
        else:
            w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) * 0.3
            nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}",
                                          group=channels, pads=[1, 1, 1, 1]))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("HardSwish", [f"c{i}"], [f"h{i}"], name=f"hswish{i}"))
        prev = f"h{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((channels, 10)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "hardswish_chain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_real_timing_smoke_decision_follows_its_own_measurement():
    """The search with real timings runs end to end and keeps int8 only on a confident win. Whether
    the result is faster is a timing target: benchmarks/run_latency_aware.py measures it
    (results/latency_aware.md), since a pass/fail timing of a 0.25 ms model flips under load."""
    rng = np.random.default_rng(0)
    proto = _hardswish_chain(rng)
    x = rng.standard_normal((32, 3, 64, 64)).astype(np.float32)
    p = QuantizePass(max_trials=4)
    p.context = PassContext(calibration=ArrayDataset(x))
    result = p(ir.from_proto(proto))
    la, trials = result.details["latency_aware"], result.details["latency_trials"]
    assert la["searched"] and la["float_p50_ms"] >= 0.1 and 1 <= len(trials) <= 4
    if result.modified:  # an int8 configuration was kept: it was faster than float with confidence
        assert la["result"] == "int8" and trials[la["chosen_trial"]]["latency_ratio_ci"][1] < 1.0
    else:
        assert la["result"] == "float"


# -- the search's decision -------------------------------------------------------------------------
class TablesProbe(LatencyProbe):
    """compare() looks the candidate's ratio up by file name; profile() returns fixed costs."""

    def __init__(self, ratios: dict[str, float]):
        self.ratios = ratios

    def compare(self, reference, model, feeds, threads):
        if reference.name in self.ratios and model.name in self.ratios:  # head to head
            r = self.ratios[model.name] / self.ratios[reference.name]
        else:
            r = self.ratios[model.name]
        return Timing(r, (r * 0.99, r * 1.01), 1.0, r)

    def profile(self, path, proto, feeds, threads):
        return NodeCosts({"a": 1.0, "b": 0.1, "c": 1.0}, {}, 2.1, 0.0)


def _chain_abc() -> onnx.ModelProto:
    """x -> a (Conv) -> b (PRelu) -> c (Conv) -> y."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    slope = numpy_helper.from_array(np.full((2, 1, 1), 0.1, np.float32), "slope")
    nodes = [helper.make_node("Conv", ["x", "w"], ["ta"], name="a"),
             helper.make_node("PRelu", ["ta", "slope"], ["tb"], name="b"),
             helper.make_node("Conv", ["tb", "w"], ["y"], name="c")]
    graph = helper.make_graph(nodes, "abc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w, slope])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _search(tmp_path, monkeypatch, ratios, met, labelings, **kw):
    cuts = iter(labelings)
    monkeypatch.setattr(CostModel, "cut", lambda self, weight=1.0: set(next(cuts, {"a", "c"})))
    proto = _chain_abc()

    def quantize(excluded, path):
        path = tmp_path / ("int8-" + "".join(sorted(excluded)) + ".onnx")
        path.touch()
        return path

    (tmp_path / "int8-.onnx").touch()
    return latency_search.search(float_path=tmp_path / "float.onnx", trial0=tmp_path / "int8-.onnx", pre_proto=proto,
                       qdq0_proto=proto, capable=["a", "c"], feeds={"x": np.zeros((1, 2, 4, 4), np.float32)},
                       threads=1, probe=TablesProbe(ratios), quantize=quantize,
                       check=lambda path: {"agreement": 1.0, "met": met[path.name]}, internal_unfused=2,
                       max_trials=kw.get("max_trials", 8), budget_s=60.0, min_ms=0.1, tmp=tmp_path)


def test_search_keeps_the_fastest_configuration_that_meets_the_accuracy_rule(tmp_path, monkeypatch):
    # trial 1 (a int8, c float) is the fastest but breaks the accuracy rule; trial 2 meets it
    ratios = {"int8-.onnx": 1.2, "int8-c.onnx": 0.6, "int8-a.onnx": 0.8}
    met = {"int8-.onnx": True, "int8-c.onnx": False, "int8-a.onnx": True}
    out = _search(tmp_path, monkeypatch, ratios, met, [{"a"}, {"c"}])
    assert [t["excluded"] for t in out.trials] == [[], ["c"], ["a"]]
    assert out.path.name == "int8-a.onnx" and out.excluded == ["a"]
    assert out.summary["chosen_trial"] == 2 and out.trials[2]["chosen"]
    assert out.note.startswith("latency-aware: trial 2 kept, 1 node back to float (Conv x1): 0.80x float latency")


def test_search_head_to_head_decides_between_overlapping_candidates(tmp_path, monkeypatch):
    # 0.70 and 0.71 overlap; timed against each other, the second is the faster one
    ratios = {"int8-.onnx": 1.2, "int8-c.onnx": 0.70, "int8-a.onnx": 0.71}
    met = dict.fromkeys(ratios, True)
    probe_ratios = dict(ratios)
    out = _search(tmp_path, monkeypatch, probe_ratios, met, [{"a"}, {"c"}])
    assert out.summary["head_to_head"]["trials"] == [1, 2] and out.path.name == "int8-c.onnx"
    probe_ratios["int8-c.onnx"] = 0.72  # now trial 2 leads by its own ratio and wins the duel too
    out = _search(tmp_path, monkeypatch, probe_ratios, met, [{"a"}, {"c"}])
    assert out.summary["head_to_head"]["trials"] == [2, 1] and out.path.name == "int8-a.onnx"


def test_search_returns_float_when_nothing_is_faster_with_confidence(tmp_path, monkeypatch):
    # 0.99 is not a 2% gain: within what a busy host shifts between runs
    ratios = {"int8-.onnx": 1.3, "int8-c.onnx": 0.99, "int8-a.onnx": 1.05}
    out = _search(tmp_path, monkeypatch, ratios, dict.fromkeys(ratios, True), [{"a"}, {"c"}])
    assert out.path is None and out.summary["result"] == "float" and len(out.trials) == 3
    assert not any(t.get("chosen") for t in out.trials)


def test_search_tie_goes_to_fewer_float_nodes(tmp_path, monkeypatch):
    # a candidate 0.7% faster than the first quantization cannot be told apart from it head to head
    ratios = {"int8-.onnx": 0.70, "int8-c.onnx": 0.695}
    out = _search(tmp_path, monkeypatch, ratios, dict.fromkeys(ratios, True), [{"a"}])
    low, high = out.summary["head_to_head"]["ci"]
    assert low <= 1.0 <= high and out.path.name == "int8-.onnx" and out.summary["chosen_trial"] == 0
    assert out.note.startswith("latency-aware: kept the first quantization (0.70x float latency")


# -- the search's time budget ----------------------------------------------------------------------
class Clock:
    """A fake ``time`` for latency_search: every stage advances it by a fixed number of seconds."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _budgeted_search(tmp_path, monkeypatch, *, budget_s, timing_s, scoring_s, profile_s, quantize_s, ratios):
    clock = Clock()
    monkeypatch.setattr(latency_search, "time", clock)
    cuts = iter([{"a"}, {"c"}, set()])
    monkeypatch.setattr(CostModel, "cut", lambda self, weight=1.0: set(next(cuts, {"a", "c"})))
    calls = []

    class SlowProbe(TablesProbe):
        def compare(self, reference, model, feeds, threads):
            calls.append("compare")
            clock.now += timing_s
            return super().compare(reference, model, feeds, threads)

        def profile(self, path, proto, feeds, threads):
            calls.append("profile")
            clock.now += profile_s
            return super().profile(path, proto, feeds, threads)

    def quantize(excluded, path):
        clock.now += quantize_s
        path = tmp_path / ("int8-" + "".join(sorted(excluded)) + ".onnx")
        path.touch()
        return path

    def check(path):
        calls.append("score")
        clock.now += scoring_s
        return {"agreement": 1.0, "met": True}

    (tmp_path / "int8-.onnx").touch()
    proto = _chain_abc()
    out = latency_search.search(float_path=tmp_path / "float.onnx", trial0=tmp_path / "int8-.onnx", pre_proto=proto,
                                qdq0_proto=proto, capable=["a", "c"], feeds={"x": np.zeros((1, 2, 4, 4), np.float32)},
                                threads=1, probe=SlowProbe(ratios), quantize=quantize, check=check,
                                internal_unfused=2, max_trials=8, budget_s=budget_s, min_ms=0.1, tmp=tmp_path)
    return out, calls, clock.now


def test_search_stops_after_the_first_timing_when_it_spends_the_budget(tmp_path, monkeypatch):
    # a 40 s timing against a 5 s budget: nothing after it runs (no scoring, no profile, no trial)
    ratios = {"int8-.onnx": 0.8, "int8-c.onnx": 0.5, "int8-a.onnx": 0.6}
    out, calls, spent = _budgeted_search(tmp_path, monkeypatch, budget_s=5, timing_s=40, scoring_s=20,
                                         profile_s=10, quantize_s=5, ratios=ratios)
    assert calls == ["compare"] and spent == 40
    assert out.summary["budget"] == {"budget_s": 5, "spent_s": 40.0, "stopped_before": "scoring the first quantization"}
    assert out.summary["result"] == "int8" and out.path.name == "int8-.onnx" and len(out.trials) == 1
    assert out.note == ("latency-aware: kept the first quantization (0.80x float latency [0.79, 0.81]); the search "
                        "stopped before scoring the first quantization at latency_budget_s 5 (40.0 s spent)")
    # the same stop when the first quantization is not faster with confidence: the float model
    ratios["int8-.onnx"] = 0.99
    out, _, _ = _budgeted_search(tmp_path, monkeypatch, budget_s=5, timing_s=40, scoring_s=20, profile_s=10,
                                 quantize_s=5, ratios=ratios)
    assert out.path is None and out.summary["result"] == "float"
    assert out.note.startswith("latency-aware: the first quantization was not faster than float with confidence "
                               "(0.99x float latency")


def test_search_starts_a_trial_only_when_it_fits_the_budget(tmp_path, monkeypatch):
    # timing 10 s, scoring 5 s, profiles 2 x 2 s, re-quantization 3 s: after the first timing (10),
    # its scoring (15) and the profiles (19), trial 1 is predicted at 15 s (fits 45: ends at 37);
    # trial 2, predicted as long as trial 1 (18 s), does not
    ratios = {"int8-.onnx": 1.2, "int8-c.onnx": 0.5, "int8-a.onnx": 0.6}
    out, calls, spent = _budgeted_search(tmp_path, monkeypatch, budget_s=45, timing_s=10, scoring_s=5,
                                         profile_s=2, quantize_s=3, ratios=ratios)
    assert calls == ["compare", "score", "profile", "profile", "compare", "score"]
    assert spent == 37 <= 45 and [t["excluded"] for t in out.trials] == [[], ["c"]]
    assert out.summary["budget"] == {"budget_s": 45, "spent_s": 37.0, "stopped_before": "trial 2"}
    assert out.path.name == "int8-c.onnx" and out.summary["chosen_trial"] == 1
    assert out.note.endswith("; the search stopped before trial 2 at latency_budget_s 45 (37.0 s spent)")
    # a generous budget runs every candidate and says nothing about the budget
    out, _, spent = _budgeted_search(tmp_path, monkeypatch, budget_s=1000, timing_s=10, scoring_s=5,
                                     profile_s=2, quantize_s=3, ratios=ratios)
    assert len(out.trials) == 3 and out.summary["budget"]["stopped_before"] is None
    assert "budget" not in out.note


def test_pass_reports_a_search_the_budget_stopped(gated_proto, digits):
    # plain int8 slower (the gates), and a budget the first timing alone overruns: the search stops
    # there, the float model is returned, and the note and the details say why
    x, _ = digits
    probe = FakeProbe(**GATES_SLOW)
    result = _run(gated_proto, x, probe, latency_budget_s=1e-6)
    la = result.details["latency_aware"]
    assert probe.calls == ["compare"] and len(result.details["latency_trials"]) == 1
    assert la["searched"] is False and la["result"] == "float"
    assert la["budget"]["stopped_before"] == "scoring the first quantization" and la["budget"]["budget_s"] == 1e-6
    assert not result.modified
    assert any(re.fullmatch(r"latency-aware: the first quantization was not faster than float with confidence "
                            r"\(1\.\d\dx float latency \[1\.\d\d, 1\.\d\d\]\); the float model is returned "
                            r"unchanged; the search stopped before scoring the first quantization at "
                            r"latency_budget_s 1e-06 \(\d+\.\d s spent\)", n) for n in result.notes)
