"""Datasets (built-in procedural sets, torchvision's files, image folders) and image decoding."""

from resviz.data.datasets import DATASETS, DatasetBundle, available_datasets, load_dataset
from resviz.data.files import DatasetUnavailable

__all__ = ["DATASETS", "DatasetBundle", "DatasetUnavailable", "available_datasets", "load_dataset"]
