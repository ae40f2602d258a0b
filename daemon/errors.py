"""The project's exception root and its few subclasses."""


class AnomalydError(Exception):
    """Root of every error anomalyd raises on purpose."""


class ConfigError(AnomalydError):
    """The configuration file or environment is invalid."""


class ModelLoadError(AnomalydError):
    """Model artifacts are missing, altered or inconsistent with their manifest."""


class ModelAccessError(ModelLoadError):
    """The model files are there but may not be read, or trusted, as they stand (owner,
    permissions): the message says what to change; training anew would not help."""


class TrainingError(AnomalydError):
    """Training data is unusable or training failed."""


class BrokerError(AnomalydError):
    """The MQTT broker cannot be reached or refused the connection."""


class BrokerRefusedError(BrokerError):
    """The broker refused these credentials, this client id or certificate, or cannot give
    QoS 1: starting again as configured cannot help (a service manager should not retry)."""


class StoppedWhileStartingError(AnomalydError):
    """A stop was asked for (SIGTERM, SIGINT) while the daemon was still connecting: it
    had taken no reading, so it stops at once and loses nothing."""
