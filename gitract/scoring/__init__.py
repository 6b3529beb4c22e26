"""The competition metric and what is measured with it.

- ``metrics``: Dice/IoU while training, and the competition score (Dice + 3D Hausdorff) under
  each metric profile (``kaggle``: the documented reading; ``mlebench``: mle-bench's grader).
- ``files``: scoring a submission CSV against labels on disk (``scripts/evaluate.py``).
- ``visualize``: truth-vs-prediction pictures.
"""
