"""Datasets as tensors, and the batch loader that slices them on the training device."""

from bprun.data.loader import InMemoryLoader
from bprun.data.sources import Dataset, split_validation

__all__ = ["Dataset", "InMemoryLoader", "split_validation"]
