"""Datasets, few-shot splits and distortion synthesis (method.md 5-8).

Modules (each layer uses only the ones above it):

- :mod:`~grmpiqa.data.datasets`: the types, :class:`Item`, :class:`Dataset`, :class:`Scale`;
- :mod:`~grmpiqa.data.readers`: CSV / .xlsx / .mat readers and the image-path rules;
- :mod:`~grmpiqa.data.kinds`: the registry of dataset kinds (:func:`register_kind`),
  spec parsing and :func:`load_dataset`;
- :mod:`~grmpiqa.data.splits`: the few-shot split protocol and split files;
- :mod:`~grmpiqa.data.distortions`: the registry of KADID distortion types
  (:func:`~grmpiqa.data.distortions.register_distortion`);
- :mod:`~grmpiqa.data.synth`: ``grmpiqa synth``'s writer (:func:`synthesize`);
"""

from grmpiqa.data.datasets import Dataset, Item, Scale
from grmpiqa.data.distortions import TYPE_NAMES as DISTORTION_TYPES
from grmpiqa.data.distortions import DistortionType, list_distortions
from grmpiqa.data.kinds import KINDS, Kind, get_kind, list_kinds, load_dataset, parse_spec
from grmpiqa.data.splits import Split, make_split, make_splits, read_splits, write_splits
from grmpiqa.data.synth import SynthConfig, synthesize

__all__ = [
    "DISTORTION_TYPES",
    "KINDS",
    "Dataset",
    "DistortionType",
    "Item",
    "Kind",
    "Scale",
    "Split",
    "SynthConfig",
    "get_kind",
    "list_distortions",
    "list_kinds",
    "load_dataset",
    "make_split",
    "make_splits",
    "parse_spec",
    "read_splits",
    "synthesize",
    "write_splits",
]
