"""gitract: a 2.5D U-Net pipeline for the UW-Madison GI Tract Image Segmentation competition."""

import os

# albumentations looks up its latest version on PyPI at import time; Kaggle kernels and CI
# run offline, where that lookup only costs time (and is a network call we promise not to make).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from gitract._versions import check_versions

check_versions()

__version__ = "0.1.0"
