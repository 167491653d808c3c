"""Data for ul_fast: the embedded Fashion-MNIST subset, loaders, a resumable batch stream, captions.

Every loader returns an :class:`ImageArrayDataset` (float32 ``[N, C, H, W]`` in [-1, 1], optional int64
labels). :func:`load_dataset` picks a loader from a spec string; :class:`BatchStream` yields shuffled
batches with an exactly restorable position; :class:`Conditioning` gives the class labels and caption
embeddings of training batches, sample grids and sampling requests.
"""

from .arrays import LAYOUTS, array_to_dataset, detect_layout, load_array
from .captions import (
    CAPTION_TEMPLATES,
    FASHION_MNIST_NOUNS,
    all_fashion_mnist_captions,
    captions_for_class,
    fashion_mnist_captions,
    with_article,
)
from .conditioning import Conditioning
from .dataset import ImageArrayDataset, resize_images, uint8_to_float
from .fashion_mnist import (
    DEBIAN_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    load_embedded_fashion_mnist,
    load_fashion_mnist_idx,
    read_idx,
)
from .folder import IMAGE_EXTENSIONS, load_image_folder
from .spec import DATASET_SPECS, load_dataset
from .stream import BatchStream

__all__ = [
    "BatchStream",
    "CAPTION_TEMPLATES",
    "Conditioning",
    "DATASET_SPECS",
    "DEBIAN_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_NOUNS",
    "IMAGE_EXTENSIONS",
    "ImageArrayDataset",
    "LAYOUTS",
    "all_fashion_mnist_captions",
    "array_to_dataset",
    "captions_for_class",
    "detect_layout",
    "fashion_mnist_captions",
    "load_array",
    "load_dataset",
    "load_embedded_fashion_mnist",
    "load_fashion_mnist_idx",
    "load_image_folder",
    "read_idx",
    "resize_images",
    "uint8_to_float",
    "with_article",
]
