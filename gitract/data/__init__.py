"""From the competition's files to training samples: the first step of the pipeline.

- ``layout``: the Kaggle folder layout, slice file names and ``train.csv`` into a slice table.
- ``rle``: run-length encoding of masks (1-indexed, row-major, as the data has it).
- ``folds``: leakage-free folds (every day of a case in one fold), ``folds.csv``.
- ``cache``: each case-day decoded once into ``.npy`` volumes on disk (the volume cache).
- ``grid``: case-days resampled once to the 3D grid, beside the volume cache.
- ``slices``: the 2.5D slice dataset and its augmentations.
- ``patches``: 3D training patches cut from the grid volumes.
- ``geometry``: the canvas (pad or resize) and the way back to each slice's own size.
- ``synthetic``: a synthetic data set in the exact Kaggle layout (tests and the demo).
"""
