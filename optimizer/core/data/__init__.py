"""Datasets for calibration, evaluation and training, and the preprocessing that feeds a model.

``open_dataset(spec)`` turns a spec (``mnist?split=test&limit=500``, or a recipe mapping) into a
``Dataset`` that streams preprocessed samples in a fixed order. The topics live in submodules:

- ``spec``: how a recipe or the CLI names a dataset (``DatasetSpec``), and its validation;
- ``preprocess``: presets and the per-sample maths (``Preprocess``, ``PreprocessSettings``);
- ``sources``: where raw samples come from (built-in data, folders, ``.npy``/``.npz`` files);
- ``datasets``: the ``Dataset`` interface, splits and order, and ``open_dataset``;
- ``multi``: data for every input of a model (``open_model_data``: per-input npz arrays, constants).
"""

from deployopt.core.data.datasets import ArrayDataset, Dataset, StreamingDataset, UnfixedDims, open_dataset
from deployopt.core.data.multi import MultiInputDataset, open_model_data
from deployopt.core.data.preprocess import PREPROCESS_KEYS, PRESETS, Preprocess, PreprocessSettings
from deployopt.core.data.spec import (BUILTIN_DATASETS, DATASET_KEYS, PATH_KINDS, DatasetSpec, check_spec,
                                      parse_spec, validate_spec)

__all__ = ["ArrayDataset", "BUILTIN_DATASETS", "DATASET_KEYS", "Dataset", "DatasetSpec", "MultiInputDataset",
           "PATH_KINDS", "PREPROCESS_KEYS", "PRESETS", "Preprocess", "PreprocessSettings", "StreamingDataset",
           "UnfixedDims", "check_spec", "open_dataset", "open_model_data", "parse_spec", "validate_spec"]
