"""Datasets, few-shot splits and distortion synthesis (method.md 5-8)."""

from grmpiqa.data.datasets import KINDS, Dataset, Item, load_dataset, parse_spec
from grmpiqa.data.splits import Split, make_split, make_splits, read_splits, write_splits

__all__ = [
    "KINDS",
    "Dataset",
    "Item",
    "Split",
    "load_dataset",
    "make_split",
    "make_splits",
    "parse_spec",
    "read_splits",
    "write_splits",
]
