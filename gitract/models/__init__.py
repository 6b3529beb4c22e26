"""The networks: build them, save and reload them, and predict with one run's folds.

- ``kind``: the interface every model kind implements (build, rebuild from a checkpoint,
  training dataset, one run's folds as one predictor of case-days at native size).
- ``kinds``: the registry, ``model.kind`` -> its kind (``kind_of(cfg)``).
- ``kind2d``: the 2.5D kind (fold ensemble with flip TTA on the canvas, slices back to size).
- ``kind3d``: the 3D kind (sliding windows over whole case-days, back to the native size).
- ``smp2d``: the 2.5D smp network (any architecture and encoder, weights from a local file).
- ``monai3d``: the 3D MONAI network.
- ``precision``: the one precision policy (autocast dtype, loss scaler, memory format).
- ``losses``: Dice + BCE.
- ``checkpoint``: checkpoints written atomically, read safely, found in a runs folder.
"""
