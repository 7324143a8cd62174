"""deployopt core: model I/O, errors, statistics, datasets, settings and the onnxruntime session factory.

The bottom layer: it imports nothing else from deployopt.
"""
