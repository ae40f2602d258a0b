"""Keras training of the dense autoencoder: the only module that imports TensorFlow."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence oneDNN/CUDA banner lines

#: Notices TensorFlow's C++ runtime writes straight to file descriptor 2 on every run, which
#: TF_CPP_MIN_LOG_LEVEL no longer reaches (TensorFlow 2.21): the oneDNN and CPU-feature
#: banners, and an "E" line about a tf.data attribute that Keras' own input pipeline causes.
#: They look like errors in the middle of training's progress and mean nothing here.
_BENIGN = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} [^\]]*\] (oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized"
    r"|NodeDef mentions attribute use_unbounded_threadpool))"
)


@contextlib.contextmanager
def native_notices_filtered() -> Iterator[None]:
    """Capture what native code writes to stderr while the block runs, then pass every
    line on except the benign notices above (an error's output is never dropped)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            text = buf.read().decode("utf-8", errors="replace")
            kept = [ln for ln in text.splitlines(keepends=True) if not _BENIGN.match(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


with native_notices_filtered():
    import keras
    import tensorflow as tf

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
    with native_notices_filtered():
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
