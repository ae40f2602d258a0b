"""anomalyd: real-time anomaly detection for industrial IoT sensor streams over MQTT."""

__version__ = "0.1.0"
