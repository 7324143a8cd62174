"""Recover: fine-tune a pruned model's own weights by distillation from the model it came from.
``recover_pass`` is the pass, ``interpreter`` runs the ONNX graph as a torch module, ``views``
draws the augmented training copies the teacher labels."""

from deployopt.passes.recover.recover_pass import RecoverPass

__all__ = ["RecoverPass"]
