"""deployopt measuring harness: latency (``latency``, ``timing``, ``latency_report``), per-node
profiles (``profile``), accuracy and fidelity (``accuracy``, ``metrics``, the task metrics ``tasks``
and ``judge``, the one rule by which every accuracy decision compares a model with a reference), what the models are fed
(``inputs``, ``model_io``), worker processes and their memory (``worker``, ``memory``), output
files (``output``) and the machine stamp (``machine``).

Imports only deployopt.core.
"""
