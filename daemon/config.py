"""Configuration: strict pydantic models, loaded from TOML, overridden by the environment.

One model per concern; unknown keys are errors (``extra="forbid"``) so a typo fails at
start-up with the field's path. Environment overrides live in ``ENV_OVERRIDES`` and nowhere
else. Runtime objects are built by the wiring code (``daemon.service``), not here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.alerts import MAX_BACKOFF
from daemon.baseline import THRESHOLD_MARGIN
from daemon.errors import ConfigError
from daemon.topics import could_match, templates_overlap, unshared

DEFAULT_CONFIG_PATH = Path("config/anomalyd.toml")
#: The most worker processes (``service.workers``, ``WORKERS``).
MAX_WORKERS = 64
MASK = "********"  # what a secret looks like in /info and check-config
MIN_PACKET_BYTES = 1024  # the smallest mqtt.max_packet_bytes accepted


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _unexpanded(value: Any) -> Any:
    """A path setting as given, refused if it starts with ``~``: nothing expands it (not
    anomalyd, nor systemd's Environment=, nor a compose file), so ``STATE_DIR=~/state``
    made a directory named ``~`` in the working directory and every device started
    afresh there, without a word."""
    if isinstance(value, str | Path) and str(value).startswith("~"):
        raise ValueError(f"{str(value)!r}: '~' is not expanded here (nor by systemd or a "
                         f"compose file): give the full path")
    return value


#: A path setting: refused if it starts with ``~`` (``_unexpanded``).
SettingPath = Annotated[Path, BeforeValidator(_unexpanded)]
OptionalSettingPath = Annotated[Path | None, BeforeValidator(_unexpanded)]


class TlsConfig(_Strict):
    enabled: bool = False
    ca_file: OptionalSettingPath = None  # None: the system's trusted CAs
    cert_file: OptionalSettingPath = None  # client certificate (mutual TLS), with key_file
    key_file: OptionalSettingPath = None
    verify_hostname: bool = True
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _check(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        given = [name for name in ("ca_file", "cert_file", "key_file")
                 if getattr(self, name) is not None]
        if given and not self.enabled:
            # MQTT_CA_FILE set and MQTT_TLS forgotten: the link went out unencrypted (the
            # password with it), and to a TLS port failed only after connect_timeout_s
            raise ValueError(
                f"{' and '.join(given)} given while enabled is false (MQTT_TLS): the "
                f"connection would not use TLS and the file(s) would be ignored. Set "
                f"mqtt.tls.enabled = true (MQTT_TLS=true), or leave them out")
        return self


class MqttConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = Field("anomalyd", min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    password_file: OptionalSettingPath = None
    tls: TlsConfig = TlsConfig()
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(86400, ge=0, le=4_294_967_295)  # MQTT's 4-byte limit
    subscription: str = "sensors/+/readings"
    receive_maximum: int = Field(1000, ge=1, le=65535)
    max_outstanding_publishes: int = Field(2000, ge=1, le=20000)
    reconnect_min_delay_s: float = Field(0.5, gt=0)
    reconnect_max_delay_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(30.0, ge=0)
    tcp_nodelay: bool = True
    #: the broker's packet size limit, where it does not announce one (MQTT 3.1.1, or a
    #: documented cap); 0: only the limit an MQTT 5 broker announces (daemon.oversize)
    max_packet_bytes: int = Field(0, ge=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        """``protocol = 5``, a TOML number, as ``"5"`` (refused before, with "Input should
        be '5' or '3.1.1'")."""
        return "5" if isinstance(value, int | float) and value == 5 else value

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if "+" not in self.subscription:
            raise ValueError("subscription must contain a '+' level for the device id")
        ids = unshared(self.subscription).split("/").count("+")
        if ids > 1:
            raise ValueError(
                f"subscription {self.subscription!r} has {ids} '+' "
                f"levels: the device id is the one '+' level, and with more, devices of "
                f"different sites or lines would share an id (their windows, baselines and "
                f"alerts mixed). Give one '+' (e.g. plant/site1/+/readings, a daemon or a "
                f"subscription per site), and put what tells them apart in the device id")
        if "://" in self.host or self.host.count(":") == 1:
            raise ValueError(
                f"host {self.host!r}: the broker's name or address alone (the port is "
                f"mqtt.port / MQTT_PORT; TLS is mqtt.tls.enabled / MQTT_TLS)")
        if self.username is None and (self.password is not None
                                      or self.password_file is not None):
            raise ValueError("a password without username (MQTT_USERNAME) is never sent: "
                             "set mqtt.username too")
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        if self.password is not None and self.password_file is not None:
            raise ValueError(
                "set password or password_file, not both (MQTT_PASSWORD and "
                "MQTT_PASSWORD_FILE set them too, and override the file key by key: a "
                "password in the file stays beside MQTT_PASSWORD_FILE)")
        if 0 < self.max_packet_bytes < MIN_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be 0 (the broker's own limit) or at "
                             f"least {MIN_PACKET_BYTES}: a verdict needs about that much")
        return self

    def secret(self) -> str | None:
        """The broker password, from the environment/file setting or the password file."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read mqtt.password_file (MQTT_PASSWORD_FILE) "
                                  f"{self.password_file}: {exc.strerror}") from exc
        return None


class TopicsConfig(_Strict):
    verdict: str = "anomaly/{device_id}/verdict"
    alert: str = "anomaly/{device_id}/alert"
    dead_letter: str = "anomaly/dead-letter"
    status: str = "anomaly/status"
    presence: str = "anomaly/{device_id}/presence"

    @model_validator(mode="after")
    def _check(self) -> TopicsConfig:
        for name in ("verdict", "alert", "presence"):
            template = getattr(self, name)
            if "{device_id}" not in template:
                raise ValueError(f"topics.{name} must contain '{{device_id}}'")
        names = ("verdict", "alert", "dead_letter", "status", "presence")
        for name in names:
            if any(c in getattr(self, name).replace("{device_id}", "") for c in "+#"):
                raise ValueError(f"topics.{name} must not contain MQTT wildcards")
            if not getattr(self, name).strip("/"):
                raise ValueError(f"topics.{name} is empty")
        templates = [getattr(self, name) for name in names]
        if len(set(templates)) != len(templates):
            raise ValueError("topics: each kind of result needs its own topic (verdicts, "
                             "alerts, dead letters, status and presence would mix)")
        return self


class BatchConfig(_Strict):
    max_batch_size: int = Field(256, ge=1, le=100_000)
    max_wait_ms: float = Field(10.0, ge=0)
    max_batch_bytes: int = Field(1_048_576, ge=1024)
    queue_size: int = Field(2000, ge=1)


class LimitsConfig(_Strict):
    max_payload_bytes: int = Field(65536, ge=64)
    max_batch_readings: int = Field(1000, ge=1)
    device_id_pattern: str = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
    # Per-device token bucket, in readings: 0 turns it off.
    device_rate_per_s: float = Field(0.0, ge=0)
    device_burst: int = Field(1000, ge=1)
    # Devices anomalyd keeps state for (window, baseline, alert); readings of further
    # devices are dead-lettered as too_many_devices. Bounds memory and the state file.
    max_devices: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        try:
            pattern = re.compile(self.device_id_pattern)
        except re.error as exc:
            raise ValueError(f"device_id_pattern does not compile: {exc}") from None
        # an id is one topic level, and names a device: never empty, never a wildcard
        bad = [repr(x) for x in ("", "a/b", "+", "#") if pattern.fullmatch(x)]
        if bad:
            raise ValueError(f"device_id_pattern {self.device_id_pattern!r} allows the id(s) "
                             f"{', '.join(bad)}: a device id is one topic level, neither empty "
                             f"nor holding '/', '+' or '#'")
        return self


class ReadingsConfig(_Strict):
    # A reading whose timestamp is more than late_after_s older than the newest of its
    # device's earlier messages is late (daemon/lateness.py): a backlog sent after live
    # readings, a second gateway. 0 turns the check off (every reading judged in arrival order).
    late_after_s: float = Field(60.0, ge=0, le=30 * 86_400)
    # "judge": judged against the device's current window, marked "late": true, and kept
    # out of its window, baseline and alert; "drop": dead-lettered as late, unjudged.
    late_policy: Literal["judge", "drop"] = "judge"
    # A reading the broker delivers with the retain flag is its stored copy of the last one
    # a device published retained, sent because the daemon (re)subscribed: old, and sent
    # again at every restart. "skip": acknowledged unjudged and counted; "judge": judged
    # like any other (each restart then judges it again and counts its device as heard).
    retained: Literal["skip", "judge"] = "skip"


class ModelConfig(_Strict):
    dir: SettingPath = Path("models")
    default_detector: str | None = None
    # A candidate model set that also judges every reading, compared only, never published
    # (daemon.shadow); it must read the same features and window. None: no shadow.
    shadow_dir: OptionalSettingPath = None


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer token required for everything but /health; None: no token.
    token: SecretStr | None = None
    token_file: OptionalSettingPath = None

    @model_validator(mode="after")
    def _check(self) -> HttpConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError(
                "set token or token_file, not both (HEALTH_TOKEN and HEALTH_TOKEN_FILE "
                "set them too, and override the file key by key: a token in the file "
                "stays beside HEALTH_TOKEN_FILE)")
        return self

    def secret(self) -> str | None:
        """The token; an empty one is refused (ConfigError), not taken for none: it would
        turn the guard off without a word."""
        if self.token is not None:
            value = self.token.get_secret_value()
            if not value.strip():
                raise ConfigError("http.token (HEALTH_TOKEN) is empty: set a token, or "
                                  "leave the setting out for none")
            return value
        if self.token_file is not None:
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read http.token_file (HEALTH_TOKEN_FILE) "
                                  f"{self.token_file}: {exc.strerror}") from exc
            if not value:
                raise ConfigError(f"http.token_file (HEALTH_TOKEN_FILE) {self.token_file} is "
                                  "empty: write the token in it, or leave the setting out "
                                  "for none")
            return value
        return None


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        """``info`` as ``INFO``, in the file as in ``LOG_LEVEL``; ``warn`` (many tools'
        spelling, and Python's own alias) as ``WARNING``."""
        if not isinstance(value, str):
            return value
        return "WARNING" if value.upper() == "WARN" else value.upper()


class AlertConfig(_Strict):
    minor_margin: float = Field(0.0, ge=0)
    major_margin: float = Field(3.0, ge=0)
    critical_margin: float = Field(10.0, ge=0)
    raise_after: int = Field(3, ge=1)
    window: int = Field(5, ge=1, le=1000)
    resolve_after: int = Field(10, ge=1)
    # An alert raised again soon after it resolved (flapping) needs twice the normal run to
    # resolve, each time, up to 2**flap_backoff x resolve_after (daemon.alerts); 0: off.
    flap_backoff: int = Field(3, ge=0, le=MAX_BACKOFF)
    # A device none of whose readings was judged for this long is announced quiet on the
    # presence topic (daemon.presence); 0 turns it off.
    quiet_after_s: float = Field(0.0, ge=0, le=30 * 86_400)

    @model_validator(mode="after")
    def _check(self) -> AlertConfig:
        if self.raise_after > self.window:
            raise ValueError("raise_after must be <= window")
        if 0 < self.quiet_after_s < 1:
            raise ValueError("quiet_after_s is 0 (off) or at least 1 second")
        if not self.minor_margin <= self.major_margin <= self.critical_margin:
            raise ValueError("minor_margin <= major_margin <= critical_margin, or severities "
                             "would skip levels")
        return self


class BaselineConfig(_Strict):
    # Off by default: on devices like the training fleet the baseline (which must agree with
    # the global model) misses some faults the global model finds; docs/evaluation.md.
    warmup_readings: int = Field(0, ge=0)
    # A device's baseline flags a reading whose deviation exceeds this many times the
    # largest one of the warm-up's held-back quarter (at least 3 conditional spreads):
    # higher, fewer false alarms and more missed faults (docs/evaluation.md measures it).
    threshold_margin: float = Field(THRESHOLD_MARGIN, ge=1.0, le=100.0)
    # Log ``baseline_drifted`` (once, until it is back within) when a device's adapted
    # centre, judged against its fitted one as the baseline judges a reading, deviates by
    # more than this many conditional spreads on any input (the units of the device's
    # threshold): a slow change the baseline is absorbing. 0: off (``anomalyd devices``
    # shows each device's drift either way).
    drift_warn_spreads: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> BaselineConfig:
        if self.drift_warn_spreads and not self.warmup_readings:
            raise ValueError(
                "drift_warn_spreads needs warmup_readings > 0: without per-device baselines "
                "no device has a centre to drift, and the warning could never come")
        return self


class StateConfig(_Strict):
    dir: SettingPath = Path("state")
    save_interval_s: float = Field(60.0, gt=0)


class ServiceConfig(_Strict):
    shutdown_timeout_s: float = Field(10.0, gt=0, le=3600)
    gil_switch_interval_ms: float = Field(0.5, gt=0, le=100)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    # How readings reach N workers: "device" (each worker subscribes to all of them and
    # judges only its own devices: one device, one worker, with any broker) or "shared"
    # (an MQTT shared subscription: the broker hands each message to one worker).
    dispatch: Literal["device", "shared"] = "device"
    # one topic level: the group of $share/<group>/<filter>
    share_group: str = Field("anomalyd", min_length=1, pattern=r"^[^/+#]+$")


class Settings(_Strict):
    mqtt: MqttConfig = MqttConfig()
    topics: TopicsConfig = TopicsConfig()
    batch: BatchConfig = BatchConfig()
    limits: LimitsConfig = LimitsConfig()
    readings: ReadingsConfig = ReadingsConfig()
    model: ModelConfig = ModelConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    alerts: AlertConfig = AlertConfig()
    baseline: BaselineConfig = BaselineConfig()
    state: StateConfig = StateConfig()
    service: ServiceConfig = ServiceConfig()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        svc = self.service
        if svc.workers > 1 and svc.dispatch == "device" and self.mqtt.subscription.startswith(
                "$share/"):
            raise ValueError(
                "mqtt.subscription is a shared subscription ($share/...), which hands each "
                "reading to one worker, while service.dispatch = \"device\" has every worker "
                "keep only its own devices' readings: the others' would be lost. Give the "
                "plain filter (e.g. sensors/+/readings), or set service.dispatch = \"shared\"")
        if self.http.port and self.http.port + svc.workers - 1 > 65535:
            raise ValueError(
                f"http.port {self.http.port} with {svc.workers} workers: worker i listens on "
                f"http.port + i, beyond 65535 for the last one")
        kinds = ("verdict", "alert", "dead_letter", "status", "presence")
        try:
            read_back = [f"topics.{kind} {getattr(self.topics, kind)!r}" for kind in kinds
                         if could_match(self.mqtt.subscription, getattr(self.topics, kind),
                                        self.limits.device_id_pattern)]
            clashes = [(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:]
                       if templates_overlap(getattr(self.topics, a), getattr(self.topics, b),
                                            self.limits.device_id_pattern)]
        except ConfigError:  # a malformed filter: reported where it is used
            read_back, clashes = [], []
        if read_back:
            raise ValueError(
                f"mqtt.subscription {self.mqtt.subscription!r} matches "
                f"{' and '.join(read_back)}: anomalyd would read its own results as readings "
                f"(each one dead-lettered, and the dead letters again, in a loop). Give the "
                f"results topics outside the subscription, or narrow it (e.g. "
                f"sensors/+/readings)")
        if clashes:
            a, b = clashes[0]
            raise ValueError(
                f"topics.{a} {getattr(self.topics, a)!r} and topics.{b} "
                f"{getattr(self.topics, b)!r} give the same topic for some device id (one "
                f"that limits.device_id_pattern allows): one kind of result would overwrite "
                f"the other (a retained alert the status, say). Give each kind its own "
                f"topic level")
        if svc.workers > 1 and svc.dispatch == "shared" and self.alerts.quiet_after_s:
            raise ValueError(
                "alerts.quiet_after_s needs service.dispatch = \"device\" (the default) or "
                "one worker: a shared subscription hands each worker only a share of a "
                "device's readings, so a worker could announce a device quiet that another "
                "one is hearing from")
        return self

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets and their paths masked."""
        data = self.model_dump(mode="json")
        # Secrets and the paths to them: a path tells an intruder where to look.
        for section, key in (("mqtt", "password"), ("mqtt", "password_file"),
                             ("http", "token"), ("http", "token_file")):
            if data[section][key] is not None:
                data[section][key] = MASK
        if data["mqtt"]["tls"]["key_file"] is not None:
            data["mqtt"]["tls"]["key_file"] = MASK
        return data


# Environment variable -> path of the key. The one place overrides are defined.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "MQTT_HOST": ("mqtt", "host"),
    "MQTT_PORT": ("mqtt", "port"),
    "MQTT_USERNAME": ("mqtt", "username"),
    "MQTT_PASSWORD": ("mqtt", "password"),
    "MQTT_PASSWORD_FILE": ("mqtt", "password_file"),
    "MQTT_TLS": ("mqtt", "tls", "enabled"),
    "MQTT_CA_FILE": ("mqtt", "tls", "ca_file"),
    "MQTT_CERT_FILE": ("mqtt", "tls", "cert_file"),
    "MQTT_KEY_FILE": ("mqtt", "tls", "key_file"),
    "HEALTH_TOKEN": ("http", "token"),
    "HEALTH_TOKEN_FILE": ("http", "token_file"),
    "MQTT_CLIENT_ID": ("mqtt", "client_id"),
    "MQTT_PROTOCOL": ("mqtt", "protocol"),
    "HEALTH_HOST": ("http", "host"),
    "HEALTH_PORT": ("http", "port"),
    "MODEL_DIR": ("model", "dir"),
    "MODEL_SHADOW_DIR": ("model", "shadow_dir"),
    "LOG_LEVEL": ("logging", "level"),
    "LOG_FORMAT": ("logging", "format"),
    "WORKERS": ("service", "workers"),
    "STATE_DIR": ("state", "dir"),
}


#: Variables whose values an error never repeats.
SECRET_VARIABLES = frozenset({"MQTT_PASSWORD", "HEALTH_TOKEN"})


#: The prefixes of the variables anomalyd reads: another variable with one is likely a
#: misspelt one (MQTT_PASWORD, HEALTH_TOKEN_FILES), which nothing else would point out.
ENV_PREFIXES = ("MQTT_", "HEALTH_", "MODEL_", "STATE_")


def unread_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """The variables set in ``env`` that look like anomalyd's (``ENV_PREFIXES``) but are
    none of ``ENV_OVERRIDES``: ignored, where a misspelt key in the file is an error."""
    env = os.environ if env is None else env
    return sorted(var for var, value in env.items()
                  if var.startswith(ENV_PREFIXES) and var not in ENV_OVERRIDES and value)


UNREAD_NOTE = ("not read by anomalyd: a misspelling? Its variables are " +
               ", ".join(ENV_OVERRIDES))


def _format_error(err: ValidationError, source: str,
                  from_env: Mapping[tuple[str, ...], tuple[str, str]] | None = None) -> str:
    """Each offending field's path and why; for a field an environment variable set
    (``from_env``: path -> (variable, value)), which one and its value (a secret's
    value aside): the header's list of variables did not say which was wrong."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        given = (from_env or {}).get(tuple(str(p) for p in e["loc"]))
        said = ""
        if given is not None:
            var, value = given
            said = f" (from {var})" if var in SECRET_VARIABLES else f" (from {var}={value!r})"
        lines.append(f"  {path}: {e['msg']}{said}")
    return "\n".join(lines)


def _default_config_present() -> bool:
    """Whether ``config/anomalyd.toml`` is in the working directory. One this user may
    not look into (``sudo -u anomalyd anomalyd train`` run from /root) is a ConfigError,
    not a traceback."""
    try:
        return DEFAULT_CONFIG_PATH.is_file()
    except OSError as exc:
        raise ConfigError(
            f"cannot look for the default configuration file {DEFAULT_CONFIG_PATH} in "
            f"{os.getcwd()}: {exc.strerror or exc} (run from a directory this user may "
            f"read, or give --config FILE)") from exc


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
    if path is None and _default_config_present():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:  # a directory, or not readable by this user
            raise ConfigError(
                f"cannot read configuration file {path}: {exc.strerror or exc} (give a "
                f"file this user may read: --config FILE)") from exc
        source = str(path)
    overridden = []
    from_env: dict[tuple[str, ...], tuple[str, str]] = {}
    for var, path_ in ENV_OVERRIDES.items():
        value = env.get(var)
        if value is None or value == "":
            continue
        table = data
        for part in path_[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"invalid configuration ({source}): {part} must be a table")
        table[path_[-1]] = (value.upper() if var == "LOG_LEVEL" else
                            value.lower() if var == "LOG_FORMAT" else value)
        overridden.append(var)
        from_env[path_] = (var, value)
    if overridden:
        source += " + environment (" + ", ".join(overridden) + ")"
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, from_env)) from exc
