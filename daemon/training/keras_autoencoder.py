"""Keras training of the dense autoencoder: the only module that imports TensorFlow."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

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
    line on except the benign notices above (an error's output is never dropped).

    Python's own ``sys.stderr`` keeps writing to the real stderr meanwhile, so progress
    lines (a long fit's) are seen as they come, not when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        on_fd_2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a stream of its own
        on_fd_2 = False
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        live = None
        if on_fd_2:
            live = open(saved, "w", buffering=1, closefd=False,  # noqa: SIM115 (closed below)
                        encoding=getattr(python_stderr, "encoding", None) or "utf-8",
                        errors="backslashreplace")
            sys.stderr = live
        try:
            yield
        finally:
            if live is not None:
                sys.stderr = python_stderr
                live.close()
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
    x: NDArray[np.float64], *, seed: int, max_epochs: int = 60, batch_size: int = 256,
    progress: Callable[[str], None] | None = None, every_s: float = 5.0,
) -> keras.Model:
    """Train on standardised rows with Adam/MSE, early stopping on a 10 % validation split.

    ``progress`` hears where the fit is (epoch, share of it, losses) at most every
    ``every_s`` seconds, and how it ended: on a recording of a day of a plant's devices
    an epoch alone can take minutes."""
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
            callbacks=[stop] if progress is None else [stop, _Progress(progress, every_s, stop)],
            verbose=0,
        )
    return model


class _Progress(keras.callbacks.Callback):  # type: ignore[misc]
    """Says where the fit is, at most every ``every_s`` seconds, and how it ended."""

    def __init__(
        self, say: Callable[[str], None], every_s: float, stop: keras.callbacks.EarlyStopping
    ) -> None:
        super().__init__()
        self._say, self._every_s, self._stop = say, every_s, stop
        self._started = self._last = time.monotonic()
        self._epoch = 0

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._every_s:
            return False
        self._last = now
        return True

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
        steps = self.params.get("steps") or 0
        if steps and batch + 1 < steps and self._due():
            self._say(f"autoencoder: epoch {self._epoch + 1} of at most "
                      f"{self.params['epochs']}, {100 * (batch + 1) // steps} % of it "
                      f"({self._elapsed()})")

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        if self._due():
            self._say(f"autoencoder: epoch {epoch + 1} of at most {self.params['epochs']} "
                      f"done, loss {logs.get('loss', float('nan')):.4g}, validation loss "
                      f"{logs.get('val_loss', float('nan')):.4g} ({self._elapsed()})")

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        epochs = self._epoch + 1
        if self._stop.stopped_epoch:
            self._say(f"autoencoder: stopped after epoch {epochs}: the validation loss "
                      f"has not improved for {self._stop.patience} epochs; the best "
                      f"epoch's weights are kept ({self._elapsed()})")
        else:
            self._say(f"autoencoder: {epochs} epochs ({self._elapsed()})")

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._started:.0f} s"


def export_layers(model: keras.Model) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
    """(kernel, bias) of each Dense layer, input to output."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return [(np.asarray(w), np.asarray(b)) for w, b in (layer.get_weights() for layer in layers)]
