"""Sweeps: search recipe settings for the fastest model that meets the gates.

``run_sweep(sweep.yaml, DIR)`` runs every trial of a sweep file (``spec``) as an optimize run
with a shared step cache (``deployopt.cache``), on local worker processes or Ray tasks
(``engines``), chosen by a grid or by optuna (``search``), and writes sweep.json, sweep.md, a
Pareto plot and the best trial per target (``results``).
"""

from __future__ import annotations

from deployopt.sweeps.results import SweepResult
from deployopt.sweeps.run import run_sweep

__all__ = ["SweepResult", "run_sweep"]
