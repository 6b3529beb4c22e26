"""From probabilities to masks, one whole case-day at a time, and the search for its settings.

- ``steps``: the per-class steps (threshold, 2D components, slice gate, z-continuity, 3D
  components) and their settings.
- ``tuning``: the search of those settings on out-of-fold probabilities, per metric profile.
"""
