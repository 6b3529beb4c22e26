"""From trained runs to a submission.

- ``blend``: runs averaged with weights, case-day by case-day, on each slice's own grid; a
  member is (name, predictor from its model kind, weight).
- ``submission``: the test submission and the out-of-fold predictions (CSV + probabilities).
"""
