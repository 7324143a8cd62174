"""The ``quantize`` pass: static int8 QDQ quantization, one topic per module.

* quantize_pass: ``QuantizePass``, its settings and the flow of ``call`` (the maths of the format)
* cpu: ``reduce_range`` for this CPU; memory: the run's peak memory, estimated before it starts;
  step_times: where the pass's time went
* data: datasets against the model's inputs, checked and streamed as feeds
* prepare: the float model made ready for onnxruntime's quantizer; equalize: the channels of
  each depthwise convolution's input scaled to one range
* calibration: streamed calibration ranges; ranges: the mse range search; dead_zones: ranges cut
  to what their readers can tell apart; calibration_choice: ``calibration: auto`` (the method
  whose int8 model is closest to float); output_error: that closeness; range_tuning:
  ``tune_ranges`` (ranges searched by it)
* quantizer: QDQ insertion for every trial; refine: GPTQ rounding and bias correction; rounding:
  AdaRound
* report: the graph accounting (int8, float and folded nodes); kernels: what onnxruntime runs
* sqnr, sensitivity: per-tensor rankings (local SQNR, output error)
* accuracy: how a candidate is judged; fallback: the accuracy fallback search
* latency_probe, cost_model, latency_search: latency-aware placement (timing and profiles, the
  min-cut cost model, the search)
"""

from deployopt.passes.quantize.quantize_pass import QuantizePass

__all__ = ["QuantizePass"]
