"""deployopt core: model I/O, recipes, the pass pipeline, data, statistics, reports and the CLI.

Nothing in this package knows a particular pass; passes live in the top-level ``passes`` package.
"""

__version__ = "0.1.0"
