"""Keras training of the dense autoencoder: the only module that imports TensorFlow."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence oneDNN/CUDA banner lines

import keras
import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

TF_VERSION: str = tf.__version__


def layer_sizes(n_features: int) -> tuple[int, int]:
    """Hidden and bottleneck widths: 16 and 4 for six features, growing modestly with d.

    The bottleneck stays narrower than the input (when d > 1) so the network cannot learn
    the identity.
    """
    return max(16, 2 * n_features), min(max(4, n_features // 2), max(1, n_features - 1))


def build_autoencoder(n_features: int) -> keras.Model:
    hidden, bottleneck = layer_sizes(n_features)
    inputs = keras.Input(shape=(n_features,))
    h = keras.layers.Dense(hidden, activation="relu")(inputs)
    h = keras.layers.Dense(bottleneck, activation="relu")(h)
    h = keras.layers.Dense(hidden, activation="relu")(h)
    outputs = keras.layers.Dense(n_features, activation="linear")(h)
    return keras.Model(inputs, outputs)


def fit_autoencoder(
    x: NDArray[np.float64], *, seed: int, max_epochs: int = 60, batch_size: int = 256
) -> keras.Model:
    """Train on standardised rows with Adam/MSE, early stopping on a 10 % validation split."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_autoencoder(x.shape[1])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=3e-3), loss="mse")
    x = np.asarray(x, dtype=np.float32)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=5, min_delta=1e-4, restore_best_weights=True
    )
    model.fit(
        x,
        x,
        epochs=max_epochs,
        batch_size=batch_size,
        validation_split=0.1,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    return model


def export_layers(model: keras.Model) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
    """(kernel, bias) of each Dense layer, input to output."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return [(np.asarray(w), np.asarray(b)) for w, b in (layer.get_weights() for layer in layers)]
