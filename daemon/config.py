"""Configuration: strict pydantic models, loaded from TOML, overridden by the environment.

One model per concern; unknown keys are errors (``extra="forbid"``) so a typo fails at
start-up with the field's path. Environment overrides live in ``ENV_OVERRIDES`` and nowhere
else. Runtime objects are built by the wiring code (``daemon.service``), not here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from daemon.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/anomalyd.toml")
MASK = "********"  # what a secret looks like in /info and check-config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = Field("anomalyd", min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(86400, ge=0)
    subscription: str = "sensors/+/readings"
    receive_maximum: int = Field(1000, ge=1, le=65535)
    max_outstanding_publishes: int = Field(2000, ge=1, le=20000)
    reconnect_min_delay_s: float = Field(0.5, gt=0)
    reconnect_max_delay_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(30.0, ge=0)
    tcp_nodelay: bool = True

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if "+" not in self.subscription:
            raise ValueError("subscription must contain a '+' level for the device id")
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        return self


class TopicsConfig(_Strict):
    verdict: str = "anomaly/{device_id}/verdict"
    alert: str = "anomaly/{device_id}/alert"
    dead_letter: str = "anomaly/dead-letter"
    status: str = "anomaly/status"

    @model_validator(mode="after")
    def _check(self) -> TopicsConfig:
        for name in ("verdict", "alert"):
            template = getattr(self, name)
            if "{device_id}" not in template:
                raise ValueError(f"topics.{name} must contain '{{device_id}}'")
        for name in ("verdict", "alert", "dead_letter", "status"):
            if any(c in getattr(self, name).replace("{device_id}", "") for c in "+#"):
                raise ValueError(f"topics.{name} must not contain MQTT wildcards")
        return self


class BatchConfig(_Strict):
    max_batch_size: int = Field(256, ge=1, le=100_000)
    max_wait_ms: float = Field(10.0, ge=0)
    queue_size: int = Field(2000, ge=1)


class LimitsConfig(_Strict):
    max_payload_bytes: int = Field(65536, ge=64)
    max_batch_readings: int = Field(1000, ge=1)
    device_id_pattern: str = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"


class ModelConfig(_Strict):
    dir: Path = Path("models")
    default_detector: str | None = None


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class AlertConfig(_Strict):
    minor_margin: float = Field(0.0, ge=0)
    major_margin: float = Field(3.0, ge=0)
    critical_margin: float = Field(10.0, ge=0)


class ServiceConfig(_Strict):
    shutdown_timeout_s: float = Field(10.0, gt=0)
    workers: int = Field(1, ge=1, le=64)
    share_group: str = "anomalyd"


class Settings(_Strict):
    mqtt: MqttConfig = MqttConfig()
    topics: TopicsConfig = TopicsConfig()
    batch: BatchConfig = BatchConfig()
    limits: LimitsConfig = LimitsConfig()
    model: ModelConfig = ModelConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    alerts: AlertConfig = AlertConfig()
    service: ServiceConfig = ServiceConfig()

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced by '********'."""
        data = self.model_dump(mode="json")
        if self.mqtt.password is not None:
            data["mqtt"]["password"] = MASK
        return data


# Environment variable -> (section, key). The one place overrides are defined.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "MQTT_HOST": ("mqtt", "host"),
    "MQTT_PORT": ("mqtt", "port"),
    "MQTT_USERNAME": ("mqtt", "username"),
    "MQTT_PASSWORD": ("mqtt", "password"),
    "MQTT_CLIENT_ID": ("mqtt", "client_id"),
    "MQTT_PROTOCOL": ("mqtt", "protocol"),
    "HEALTH_HOST": ("http", "host"),
    "HEALTH_PORT": ("http", "port"),
    "MODEL_DIR": ("model", "dir"),
    "LOG_LEVEL": ("logging", "level"),
    "WORKERS": ("service", "workers"),
}


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def load_settings(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate strictly.

    ``path=None`` reads ``config/anomalyd.toml`` when it exists, else uses defaults.
    Raises ConfigError with every offending field's path.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "defaults"
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
        source = str(path)
    overridden = []
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value is None or value == "":
            continue
        section_data = data.setdefault(section, {})
        if not isinstance(section_data, dict):
            raise ConfigError(f"invalid configuration ({source}): {section} must be a table")
        section_data[key] = value.upper() if var == "LOG_LEVEL" else value
        overridden.append(var)
    if overridden:
        source += " + environment (" + ", ".join(overridden) + ")"
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
