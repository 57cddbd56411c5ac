"""Datasets, few-shot splits and distortion synthesis (method.md 5-8)."""

from grmpiqa.data.datasets import KINDS, Dataset, Item, load_dataset, parse_spec
from grmpiqa.data.splits import Split, make_split, make_splits, read_splits, write_splits
from grmpiqa.data.synth import TYPE_NAMES as DISTORTION_TYPES
from grmpiqa.data.synth import synthesize
from grmpiqa.data.torch_data import ImageDataset

__all__ = [
    "DISTORTION_TYPES",
    "KINDS",
    "Dataset",
    "ImageDataset",
    "Item",
    "Split",
    "load_dataset",
    "make_split",
    "make_splits",
    "parse_spec",
    "read_splits",
    "synthesize",
    "write_splits",
]
