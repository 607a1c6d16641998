"""Datasets, collate functions, vocabularies and the built-in synthetic benchmark."""

from imtm.data.base import ImageCaptionDataset
from imtm.data.collate import collate, collate_images, collate_texts
from imtm.data.vocabulary import Vocabulary, tokenize

__all__ = ["ImageCaptionDataset", "collate", "collate_images", "collate_texts", "Vocabulary", "tokenize"]


def __getattr__(name):
    import importlib

    if name in ("synthetic",):
        return importlib.import_module(f"imtm.data.{name}")
    if name in ("PrecompDataset",):
        return getattr(importlib.import_module("imtm.data.precomp"), name)
    raise AttributeError(f"module 'imtm.data' has no attribute {name!r}")
