"""Measuring memory and speed: measured bytes, the analytic estimator, interleaved timers, reports.

* :func:`estimate_memory` -- per-rank bytes of weights, gradients, optimizer states and
  activations for any named model (or a user-given ``LlamaConfig``), optimizer, engine
  (single, FSDP2, DeepSpeed ZeRO-0..3) and world size, without allocating anything
  (:mod:`optimlib.bench.estimate`); checked against measurements in ``tests/bench``.
* :func:`state_bytes`, :func:`param_bytes`, :func:`grad_bytes` -- measured bytes
  (:mod:`optimlib.bench.accounting`).
* the benchmarks behind ``launch/bench.py``: :mod:`~optimlib.bench.memory`,
  :mod:`~optimlib.bench.steptime`, :mod:`~optimlib.bench.refresh`, :mod:`~optimlib.bench.fit`.
"""

from optimlib.bench.accounting import StateBytes, grad_bytes, param_bytes, saved_activation_bytes, state_bytes
from optimlib.bench.activations import activation_bytes
from optimlib.bench.estimate import MemoryEstimate, estimate_memory
from optimlib.bench.timing import interleaved, summarize

__all__ = ["MemoryEstimate", "StateBytes", "activation_bytes", "estimate_memory", "grad_bytes", "interleaved",
           "param_bytes", "saved_activation_bytes", "state_bytes", "summarize"]
