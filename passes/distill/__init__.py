"""The distilled-student swap: train a smaller student on the current model's outputs and swap it in
when it holds within tolerance. ``distill_pass`` is the pass, ``train`` the torch training loop,
``interface`` the input/output contract a student must match."""

from deployopt.passes.distill.distill_pass import DistillPass

__all__ = ["DistillPass"]
