"""Datasets, collate functions, vocabularies and the built-in synthetic benchmark."""

from imtm.data.base import ImageCaptionDataset
from imtm.data.by_image import ByImage
from imtm.data.collate import collate, collate_images, collate_texts
from imtm.data.vocabulary import Vocabulary, tokenize

__all__ = [
    "ByImage",
    "ImageCaptionDataset",
    "collate",
    "collate_images",
    "collate_texts",
    "Vocabulary",
    "tokenize",
]


# Raw-image datasets, caption augmentation and feature extraction, imported on first use
# (they pull in PIL, timm and torchvision): name -> module under imtm.data.
_LAZY = {
    "ImageFiles": "image_files",
    "ImageFileDataset": "image_files",
    "ImageReadError": "image_files",
    "KarpathyDataset": "karpathy",
    "CaptionFileDataset": "caption_files",
    "AlbefJsonDataset": "albef",
    "CsvDataset": "csv_captions",
    "CaptionAugment": "augment",
    "augment_caption": "augment",
    "image_transform": "transforms",
    "extract_features": "extract",
    "ExtractedDataset": "extracted",
    "KMeansNeighborSampler": "neighbor_sampler",
    "CocoCaptionsDataset": "coco_captions",
    "Flickr30kTokenDataset": "flickr30k_token",
    "load_dataset": "formats",
    "FORMATS": "formats",
    "from_hf_dataset": "hf",
}


def __getattr__(name):
    import importlib

    if name in ("synthetic", "transforms", "extract", "formats"):
        return importlib.import_module(f"imtm.data.{name}")
    if name in ("PrecompDataset",):
        return getattr(importlib.import_module("imtm.data.precomp"), name)
    if name in _LAZY:
        return getattr(importlib.import_module(f"imtm.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'imtm.data' has no attribute {name!r}")
