"""Training one fold.

- ``engine``: ``fit`` drives ``train_one_epoch`` and ``validate`` and writes the run folder.
- ``state``: everything ``last.pt`` holds, saved and restored as one object (``--resume``).
- ``distributed``: DDP under ``torchrun``, and the DataLoader worker count.
- ``validation``: the competition score of the validation case-days while training.
- ``plots``: ``curves.png``.
"""
