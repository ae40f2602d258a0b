"""Offline training: synthetic data, CSV datasets, fitting and writing model directories.

Importing this package does not import TensorFlow; only ``keras_autoencoder`` does.
"""
