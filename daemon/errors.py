"""The project's exception root and its few subclasses."""


class AnomalydError(Exception):
    """Root of every error anomalyd raises on purpose."""


class ConfigError(AnomalydError):
    """The configuration file or environment is invalid."""


class ModelLoadError(AnomalydError):
    """Model artifacts are missing, altered or inconsistent with their manifest."""


class TrainingError(AnomalydError):
    """Training data is unusable or training failed."""


class BrokerError(AnomalydError):
    """The MQTT broker cannot be reached or refused the connection."""


class StoppedWhileStartingError(AnomalydError):
    """A stop was asked for (SIGTERM, SIGINT) while the daemon was still connecting: it
    had taken no reading, so it stops at once and loses nothing."""
