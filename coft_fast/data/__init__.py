"""Image sources (folders, CSV, CoOp splits), class names and batched decoding."""
from coft_fast.data.loading import Batch, ImageDataset, decode_rgb, iterate_batches
from coft_fast.data.sources import (UNLABELLED, DataError, ImageSource, combine_sources, from_coop_split, from_csv,
                                    from_folder, load_source, read_class_names)

__all__ = ["UNLABELLED", "Batch", "DataError", "ImageDataset", "ImageSource", "combine_sources", "decode_rgb",
           "from_coop_split", "from_csv", "from_folder", "iterate_batches", "load_source", "read_class_names"]
