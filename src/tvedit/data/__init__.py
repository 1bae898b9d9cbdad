"""Datasets for fine-tuning and evaluation: image folders / path,label lists, splits, templates."""

from tvedit.data.images import ImageData, ImageDataset, load_image_data, resolve_templates
from tvedit.data.splits import split_indices, stream_batches

__all__ = ["ImageData", "ImageDataset", "load_image_data", "resolve_templates", "split_indices", "stream_batches"]
