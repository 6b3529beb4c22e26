"""Training one fold.

- ``engine``: ``build_loop`` makes a run's loop (network of its kind, precision, optimizer,
  EMA, schedule; ``scripts/gpu_check.py`` times it too); ``fit`` drives ``train_one_epoch`` and
  ``validate`` / ``validate_volumes`` and writes the run folder.
- ``state``: everything ``last.pt`` holds, saved and restored as one object (``--resume``).
- ``ema``: the weights' moving average, one fused update per step.
- ``sampling``: a seed per training item, so a resumed run draws what an uninterrupted one would.
- ``distributed``: DDP under ``torchrun``, and the DataLoader worker count.
- ``validation``: the competition score of the validation case-days while training.
- ``plots``: ``curves.png``.
"""
