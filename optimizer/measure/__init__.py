"""deployopt measuring harness: latency, per-node profiles, accuracy, worker processes, the machine stamp.

Imports only deployopt.core.
"""
