"""Offline training: synthetic data, CSV datasets, fitting and writing model directories.

Importing this package does not import TensorFlow; only ``keras_autoencoder`` does.
"""

#: The fewest rows a model set is fitted on (a fifth is held back to set thresholds).
MIN_ROWS = 50
#: Threshold quantiles of held-back normal scores that make sense: [low, high).
QUANTILE_RANGE = (0.5, 1.0)
