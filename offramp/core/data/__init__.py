"""Datasets and the input transforms that training and serving share.

``load_data(spec)`` turns a spec (``digits``, ``imagefolder:PATH``,
``fsdd:PATH``) into train/val tensors; ``preprocess_file`` and
``preprocess_bytes`` apply the same transform to one input at serving time.
"""
from offramp.core.data.preprocess import MODALITIES, preprocess_bytes, preprocess_file
from offramp.core.data.datasets import SPEC_KINDS, DataSplits, load_data

__all__ = ["DataSplits", "MODALITIES", "SPEC_KINDS", "load_data", "preprocess_bytes", "preprocess_file"]
