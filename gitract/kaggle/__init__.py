"""The same code in an offline Kaggle kernel.

- ``bundle``: the Kaggle dataset (wheels + trained runs) and the kernel that installs from it.
- ``estimate``: what inference will cost there (measured throughput, a blend's FLOPs).
"""
