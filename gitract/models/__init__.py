"""The networks: build them, save and reload them, and predict with one run's folds.

- ``smp2d``: the 2.5D smp network (any architecture and encoder, weights from a local file).
- ``monai3d``: the 3D MONAI network on whole case-day volumes.
- ``losses``: Dice + BCE.
- ``checkpoint``: checkpoints written atomically, read safely, found in a runs folder.
- ``predict2d`` / ``predict3d``: one run's folds as one predictor of a case-day at native size.
"""
