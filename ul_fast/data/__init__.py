"""Data for ul_fast: the embedded Fashion-MNIST subset, loaders, resumable batch streams, captions.

Every in-memory loader returns an :class:`ImageArrayDataset` (float32 ``[N, C, H, W]`` in [-1, 1], optional
int64 labels); data too large for memory is a map-style source read example by example
(:class:`LazyImageFolder`, :class:`ShardSource`, :class:`LatentCache`). :func:`load_dataset` picks one from a
spec string; :class:`BatchStream` yields shuffled batches of in-memory data with an exactly restorable
position, and :class:`StreamingBatches` the same batches of a source, decoded and augmented
(:class:`ImageTransform`) in DataLoader workers; :class:`Conditioning` gives the class labels and caption
embeddings of training batches, sample grids and sampling requests. Sources may carry captions
(:class:`CaptionTable`); their batches then hold a :class:`CaptionBatch` in place of the labels.
"""

from .arrays import LAYOUTS, array_to_dataset, detect_layout, load_array
from .augment import ImageTransform, item_rng
from .caption_data import CaptionBatch, CaptionTable, CaptionWarning, apply_caption_policy
from .captions import (
    CAPTION_TEMPLATES,
    FASHION_MNIST_NOUNS,
    all_fashion_mnist_captions,
    captions_for_class,
    fashion_mnist_captions,
    with_article,
)
from .conditioning import Conditioning
from .dataset import ImageArrayDataset, float_to_uint8, resize_images, uint8_to_float
from .errors import BadImageError
from .fashion_mnist import (
    DEBIAN_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    load_embedded_fashion_mnist,
    load_fashion_mnist_idx,
    read_idx,
)
from .folder import IMAGE_EXTENSIONS, decode_image, list_image_folder, load_image_folder, open_image
from .latent_cache import LatentCache
from .lazy_folder import LazyImageFolder
from .loader import BadImageWarning, StreamingBatches, load_examples
from .shards import ShardSource
from .spec import (
    DATASET_SPECS,
    STREAMED_IMAGES_IN_MEMORY,
    STREAMING_KINDS,
    is_streaming,
    load_dataset,
    load_images,
    spec_kind,
    splits_apart,
)
from .stream import BatchStream

__all__ = [
    "BadImageError",
    "CaptionBatch",
    "CaptionTable",
    "CaptionWarning",
    "BadImageWarning",
    "BatchStream",
    "CAPTION_TEMPLATES",
    "Conditioning",
    "DATASET_SPECS",
    "STREAMED_IMAGES_IN_MEMORY",
    "DEBIAN_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_NOUNS",
    "IMAGE_EXTENSIONS",
    "ImageArrayDataset",
    "ImageTransform",
    "LAYOUTS",
    "LatentCache",
    "LazyImageFolder",
    "STREAMING_KINDS",
    "ShardSource",
    "StreamingBatches",
    "all_fashion_mnist_captions",
    "apply_caption_policy",
    "array_to_dataset",
    "captions_for_class",
    "decode_image",
    "detect_layout",
    "fashion_mnist_captions",
    "float_to_uint8",
    "is_streaming",
    "item_rng",
    "list_image_folder",
    "load_array",
    "load_dataset",
    "load_images",
    "load_embedded_fashion_mnist",
    "load_examples",
    "load_fashion_mnist_idx",
    "load_image_folder",
    "open_image",
    "read_idx",
    "resize_images",
    "spec_kind",
    "splits_apart",
    "uint8_to_float",
    "with_article",
]
