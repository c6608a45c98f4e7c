"""Data: the synthetic brain-MRI cohort, real image-folder loaders and partitioners."""

from fedsim.data.folder import DataLayoutError, load_images, scan_image_folder
from fedsim.data.partition import PARTITIONERS, PartitionParams, list_partitioners, partition, split_train_test
from fedsim.data.synthetic_mri import CLASS_NAMES, apply_site_style, generate_cohort

__all__ = [
    "CLASS_NAMES",
    "PARTITIONERS",
    "DataLayoutError",
    "PartitionParams",
    "apply_site_style",
    "generate_cohort",
    "list_partitioners",
    "load_images",
    "partition",
    "scan_image_folder",
    "split_train_test",
]
