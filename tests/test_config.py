"""Strict configuration: defaults, the shipped file, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Settings, load_settings
from daemon.errors import ConfigError
from daemon.topics import could_match
from tests.broker import REPO


def test_shipped_config_file_is_valid_and_equals_the_defaults() -> None:
    assert load_settings(REPO / "config" / "anomalyd.toml", env={}) == Settings()


def test_every_environment_variable_is_named_in_the_shipped_file_and_the_readme() -> None:
    """The shipped file "documents every key", and an operator reads there which variable
    sets one: MODEL_SHADOW_DIR was named in the README only."""
    from daemon.config import ENV_OVERRIDES

    toml = (REPO / "config" / "anomalyd.toml").read_text()
    readme = (REPO / "README.md").read_text()
    assert [v for v in ENV_OVERRIDES if v not in toml] == []
    assert [v for v in ENV_OVERRIDES if f"`{v}`" not in readme] == []


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[mqtt]\nhost = "broker.local"\nport = 1884\n')
    s = load_settings(
        cfg,
        env={"MQTT_PORT": "2883", "LOG_LEVEL": "debug", "WORKERS": "2", "MODEL_DIR": "/srv/models",
             "LOG_FORMAT": "Console"},
    )
    assert s.logging.format == "console"  # a container's logs without a configuration file
    assert s.mqtt.host == "broker.local"
    assert s.mqtt.port == 2883
    assert s.logging.level == "DEBUG"
    assert s.service.workers == 2
    assert s.model.dir == Path("/srv/models")


def test_unknown_key_is_an_error_naming_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[mqtt]\nhots = 'x'\n")
    with pytest.raises(ConfigError, match=r"mqtt\.hots"):
        load_settings(cfg, env={})


def test_bad_values_are_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[mqtt]\nport = 70000\n[topics]\nverdict = 'anomaly/verdict'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert "mqtt.port" in str(err.value)
    assert "device_id" in str(err.value)



def _refused_then_loaded(tmp_path: Path, refused: str, match: str, loaded: str) -> Settings:
    """The configuration ``refused`` is an error matching ``match``; ``loaded`` is not:
    its settings."""
    cfg = tmp_path / "a.toml"
    cfg.write_text(refused)
    with pytest.raises(ConfigError, match=match):
        load_settings(cfg, env={})
    cfg.write_text(loaded)
    return load_settings(cfg, env={})


@pytest.mark.parametrize(
    ("refused", "match", "loaded"),
    [
        ('[limits]\ndevice_id_pattern = "[a-"\n', r"limits.*does not compile",
         '[limits]\ndevice_id_pattern = "[a-z]+"\n'),
        ('[service]\nshare_group = "a/b+"\n', r"service\.share_group",
         '[service]\nshare_group = "line-2"\n'),
        ("[alerts]\nminor_margin = 20\nmajor_margin = 5\ncritical_margin = 1\n",
         r"minor_margin <= major_margin <= critical_margin",
         "[alerts]\nminor_margin = 1\nmajor_margin = 5\ncritical_margin = 20\n"),
        ('[topics]\nalert = "anomaly/{device_id}/verdict"\n', r"its own topic",
         '[topics]\nalert = "plant/{device_id}/alarm"\n'),
        ('[topics]\nstatus = "/"\n', r"topics\.status is empty",
         '[topics]\nstatus = "plant/anomalyd"\n'),
        ('[mqtt]\nhost = ""\n', r"mqtt\.host", '[mqtt]\nhost = "broker"\n'),
        ("[http]\nport = 65535\n[service]\nworkers = 2\n", r"beyond 65535",
         "[http]\nport = 65534\n[service]\nworkers = 2\n"),
        # found by a tester: two '+' levels merged the pumps of a site into one device
        ('[mqtt]\nsubscription = "plant/+/+/readings"\n', r"has 2 '\+' levels",
         '[mqtt]\nsubscription = "plant/site1/+/readings"\n'),
        ('[logging]\nlevel = "verbose"\n', r"logging\.level",
         '[logging]\nlevel = "info"\n'),  # any case, as LOG_LEVEL (was refused in the file)
        ('[mqtt]\nhost = "127.0.0.1:1883"\n', r"the broker's name or address alone",
         '[mqtt]\nhost = "::1"\n'),
        ('[mqtt]\nhost = "mqtt://broker"\n', r"the broker's name or address alone",
         '[mqtt]\nhost = "broker"\n'),
        ('[mqtt]\npassword = "x"\n', r"a password without username",
         '[mqtt]\npassword = "x"\nusername = "anomalyd"\n'),
        ("[mqtt]\nsession_expiry_s = 4294967296\n", r"session_expiry_s",
         "[mqtt]\nsession_expiry_s = 4294967295\n"),  # a traceback at start, before
        ("[service]\nshutdown_timeout_s = 1e12\n", r"shutdown_timeout_s",
         "[service]\nshutdown_timeout_s = 60\n"),  # a traceback at SIGTERM, before
        ('[limits]\ndevice_id_pattern = ".*"\n', r"allows the id\(s\) '', 'a/b', '\+', '#'",
         '[limits]\ndevice_id_pattern = "(?i)[a-z0-9-]+"\n'),
        # a result template that gives the status topic for the device called "status"
        ('[topics]\nverdict = "plant/anomaly/{device_id}"\nstatus = "plant/anomaly/status"\n',
         r"topics\.verdict .* and topics\.status .* give the same topic",
         '[topics]\nverdict = "plant/verdict/{device_id}"\nstatus = "plant/anomaly/status"\n'),
    ],
)
def test_settings_that_run_would_refuse_are_refused_by_check_config_too(
    tmp_path: Path, refused: str, match: str, loaded: str
) -> None:
    """Each of these passed validation and then failed at start (a compile error, a
    wildcard in a topic filter, worker 1's port beyond 65535: a crash loop) or did
    something no one wants (every alert critical, alerts and verdicts on one topic)."""
    _refused_then_loaded(tmp_path, refused, match, loaded)


@pytest.mark.parametrize(
    ("subscription", "template", "matches"),
    [
        ("sensors/+/readings", "anomaly/{device_id}/verdict", False),
        ("plant/+/#", "plant/{device_id}/verdict", True),
        ("plant/+/#", "plant/dead-letter", True),  # '#' matches no level too
        ("+/+/readings", "anomaly/{device_id}/verdict", False),
        ("+/+/+", "anomaly/{device_id}/alert", True),
        ("+/status", "anomaly/status", True),
        ("+/status/+", "anomaly/status", False),
        ("dev-7/+", "dev-{device_id}/x", True),
        ("dev-x7/+", "dev-{device_id}/x", False),  # not an id the pattern allows
        ("$share/g/anomaly/+/verdict", "anomaly/{device_id}/verdict", True),
        ("+/x/#", "$SYS/x/y", False),  # a leading wildcard never matches "$" topics
    ],
)
def test_a_filter_matching_a_result_topic_is_found(
    subscription: str, template: str, matches: bool
) -> None:
    assert could_match(subscription, template, "[0-9]+") is matches
    # a pattern with a global flag (which cannot be nested in another pattern) as well
    assert could_match(subscription, template, "(?i)[0-9]+") is matches


def test_a_subscription_that_would_read_the_daemons_own_results_is_refused(
    tmp_path: Path,
) -> None:
    """Seen before this check: with subscription plant/+/# and the results under plant/,
    one reading made a verdict, the verdict a dead letter (it is no reading), the dead
    letter one more, each bigger than the last: ~4,900 dead letters in 5 s on a real
    Mosquitto, without end."""
    results = ('[topics]\nverdict = "plant/{device_id}/verdict"\n'
               'alert = "plant/{device_id}/alert"\ndead_letter = "plant/dead-letter"\n'
               'status = "plant/status"\npresence = "plant/{device_id}/presence"\n')
    settings = _refused_then_loaded(
        tmp_path, '[mqtt]\nsubscription = "plant/+/#"\n' + results,
        r"matches topics\.verdict .* its own results as readings",
        '[mqtt]\nsubscription = "plant/+/readings"\n' + results)
    assert settings.mqtt.subscription == "plant/+/readings"
    # a global flag in the id pattern switched the check off (a tester: 5,196 dead
    # letters in 5 s)
    flagged = tmp_path / "c.toml"
    flagged.write_text('[mqtt]\nsubscription = "plant/+/readings"\n[topics]\n'
                       'verdict = "plant/verdicts/{device_id}"\n'
                       'dead_letter = "plant/dead-letter/readings"\n'
                       '[limits]\ndevice_id_pattern = "(?i)[a-z0-9-]+"\n')
    with pytest.raises(ConfigError, match=r"matches topics\.verdict .* and topics\.dead_letter"):
        load_settings(flagged, env={})
    only_status = tmp_path / "b.toml"
    only_status.write_text('[mqtt]\nsubscription = "anomaly/+"\n')
    with pytest.raises(ConfigError, match=r"matches topics\.dead_letter 'anomaly/dead-letter' and "
                                          r"topics\.status 'anomaly/status':"):
        load_settings(only_status, env={})


def test_a_packet_limit_too_small_for_a_verdict_is_refused(tmp_path: Path) -> None:
    settings = _refused_then_loaded(
        tmp_path, "[mqtt]\nmax_packet_bytes = 500\n",
        r"max_packet_bytes must be 0 .* or at least 1024", "[mqtt]\nmax_packet_bytes = 131072\n")
    assert settings.mqtt.max_packet_bytes == 131072


def test_a_drift_warning_without_baselines_is_refused(tmp_path: Path) -> None:
    settings = _refused_then_loaded(
        tmp_path, "[baseline]\ndrift_warn_spreads = 8\n",
        r"drift_warn_spreads needs warmup_readings > 0",
        "[baseline]\ndrift_warn_spreads = 8\nwarmup_readings = 400\n")
    assert settings.baseline.drift_warn_spreads == 8.0


def test_tls_files_without_tls_are_refused(tmp_path: Path) -> None:
    """MQTT_CA_FILE set and MQTT_TLS forgotten was accepted: the daemon then connected
    without TLS (a username and password in clear), and to a TLS listener it retried for
    connect_timeout_s and ended on a message about MQTT 3.1.1 (a tester)."""
    settings = _refused_then_loaded(
        tmp_path, '[mqtt.tls]\nca_file = "/etc/anomalyd/ca.crt"\n',
        r"mqtt\.tls: .*ca_file given while enabled is false \(MQTT_TLS\).*MQTT_TLS=true",
        '[mqtt.tls]\nenabled = true\nca_file = "/etc/anomalyd/ca.crt"\n')
    assert settings.mqtt.tls.enabled
    with pytest.raises(ConfigError, match=r"(?s)environment \(MQTT_CA_FILE\).*ca_file given"):
        load_settings(None, env={"MQTT_CA_FILE": "/etc/anomalyd/ca.crt"})
    with pytest.raises(ConfigError, match=r"cert_file and key_file given while enabled is"):
        load_settings(None, env={"MQTT_CERT_FILE": "/c.crt", "MQTT_KEY_FILE": "/c.key"})
    assert load_settings(None, env={"MQTT_CA_FILE": "/ca.crt", "MQTT_TLS": "true"}).mqtt.tls.enabled


def test_protocol_5_written_as_a_number_is_taken(tmp_path: Path) -> None:
    """`protocol = 5` in the file was refused with "Input should be '5' or '3.1.1'": the
    operator had written 5 (a tester)."""
    cfg = tmp_path / "a.toml"
    cfg.write_text("[mqtt]\nprotocol = 5\n")
    assert load_settings(cfg, env={}).mqtt.protocol == "5"
    cfg.write_text("[mqtt]\nprotocol = 3.1\n")  # not a protocol: still refused
    with pytest.raises(ConfigError, match=r"mqtt\.protocol: Input should be '5' or '3\.1\.1'"):
        load_settings(cfg, env={})


def test_a_path_starting_with_a_tilde_is_refused(tmp_path: Path) -> None:
    """STATE_DIR=~/anomalyd-state (a systemd Environment= or a compose file expands no
    ~) made a directory named "~" in the working directory: every device started afresh
    there, without a word (a tester)."""
    with pytest.raises(ConfigError, match=r"(?s)STATE_DIR.*state\.dir: .*'~' is not "
                                          r"expanded .*give the full path"):
        load_settings(None, env={"STATE_DIR": "~/anomalyd-state"})
    settings = _refused_then_loaded(
        tmp_path, '[model]\ndir = "~/models"\n', r"model\.dir: .*'~/models': '~' is not",
        '[model]\ndir = "/home/op/models"\n')
    assert settings.model.dir == Path("/home/op/models")
    for var in ("MQTT_PASSWORD_FILE", "HEALTH_TOKEN_FILE", "MODEL_SHADOW_DIR"):
        with pytest.raises(ConfigError, match="'~' is not expanded"):
            load_settings(None, env={var: "~/x", "MQTT_USERNAME": "u"})


def test_log_level_warn_is_taken_for_warning(tmp_path: Path) -> None:
    """LOG_LEVEL=WARN (many tools' spelling, and an alias in Python's logging) was
    refused: the daemon did not start."""
    assert load_settings(None, env={"LOG_LEVEL": "WARN"}).logging.level == "WARNING"
    cfg = tmp_path / "a.toml"
    cfg.write_text('[logging]\nlevel = "warn"\n')
    assert load_settings(cfg, env={}).logging.level == "WARNING"
    with pytest.raises(ConfigError, match=r"logging\.level: Input should be 'DEBUG'"):
        load_settings(None, env={"LOG_LEVEL": "verbose"})


def test_invalid_env_value_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        load_settings(None, env={"MQTT_PORT": "not-a-port"})


def test_a_bad_environment_value_names_its_variable_and_value(tmp_path: Path) -> None:
    """With several variables set (a systemd unit, a compose file, an env file) the error
    said "mqtt.port: Input should be a valid integer" under a list of every variable
    applied: which one, and what did it hold?"""
    cfg = tmp_path / "a.toml"
    cfg.write_text("[service]\nworkers = 'many'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg, env={"MQTT_PORT": "18a3", "LOG_LEVEL": "verbose",
                                "HEALTH_PORT": "8000"})
    said = str(caught.value)
    assert "mqtt.port: Input should be a valid integer" in said
    assert "(from MQTT_PORT='18a3')" in said and "(from LOG_LEVEL='verbose')" in said
    # the file's own value: no variable named
    assert said.endswith("service.workers: Input should be a valid integer, unable to parse "
                         "string as an integer")
    assert "HEALTH_PORT=" not in said


def test_a_secret_in_the_file_beside_a_secret_file_in_the_environment_is_explained(
    tmp_path: Path,
) -> None:
    """password in the file and MQTT_PASSWORD_FILE in the unit's environment: the error
    said "set password or password_file, not both", and the operator, told that the
    environment overrides the file, had set only one of them."""
    cfg = tmp_path / "a.toml"
    cfg.write_text('[mqtt]\nusername = "u"\npassword = "p"\n[http]\ntoken = "t"\n')
    with pytest.raises(ConfigError, match=r"not both \(MQTT_PASSWORD and MQTT_PASSWORD_FILE "
                                          r"set them too, and override the file key by key"):
        load_settings(cfg, env={"MQTT_PASSWORD_FILE": "/run/secrets/pw"})
    with pytest.raises(ConfigError, match=r"a token in the file stays beside HEALTH_TOKEN_FILE"):
        load_settings(cfg, env={"HEALTH_TOKEN_FILE": "/run/secrets/token"})


def test_not_toml_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, env={})


def test_password_is_masked() -> None:
    s = load_settings(None, env={"MQTT_PASSWORD": "hunter2", "MQTT_USERNAME": "u"})
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == "hunter2"
    assert s.masked()["mqtt"]["password"] == "********"
    assert "hunter2" not in repr(s)


def test_devices_gone_quiet_are_refused_with_several_workers_on_a_shared_subscription(
    tmp_path: Path,
) -> None:
    """With shared dispatch each worker hears only a share of a device's readings
    (Mosquitto hands them out in turn): one worker could call a device quiet that another
    is hearing from. With device dispatch (the default) one worker hears all of them."""
    cfg = tmp_path / "a.toml"
    cfg.write_text("[alerts]\nquiet_after_s = 300\n")
    assert load_settings(cfg, env={}).alerts.quiet_after_s == 300
    assert load_settings(cfg, env={"WORKERS": "2"}).service.dispatch == "device"
    shared = tmp_path / "b.toml"
    shared.write_text('[alerts]\nquiet_after_s = 300\n[service]\ndispatch = "shared"\n')
    assert load_settings(shared, env={}).service.dispatch == "shared"  # one worker: fine
    with pytest.raises(ConfigError, match=r"quiet_after_s needs service\.dispatch") as err:
        load_settings(shared, env={"WORKERS": "2"})
    assert "one worker" in str(err.value)
    assert load_settings(None, env={"WORKERS": "2"}).service.workers == 2  # off: fine


def test_device_dispatch_refuses_a_shared_subscription_that_would_lose_readings(
    tmp_path: Path,
) -> None:
    """Each worker would get a share of the readings and drop those of devices it does not
    own: a reading would reach its owner only by chance."""
    cfg = tmp_path / "a.toml"
    cfg.write_text('[mqtt]\nsubscription = "$share/g/sensors/+/readings"\n')
    assert load_settings(cfg, env={}).service.workers == 1  # one worker: fine
    with pytest.raises(ConfigError, match="would be lost"):
        load_settings(cfg, env={"WORKERS": "2"})
    shared = tmp_path / "b.toml"
    shared.write_text(cfg.read_text() + '[service]\ndispatch = "shared"\n')
    assert load_settings(shared, env={"WORKERS": "2"}).service.dispatch == "shared"


@pytest.mark.parametrize(("a", "b", "pattern", "overlap"), [
    ("plant/anomaly/{device_id}", "plant/anomaly/status", r"[a-z]+", True),
    ("plant/anomaly/{device_id}", "plant/anomaly/status", r"pump-[0-9]+", False),
    ("r/{device_id}", "r/alert-{device_id}", r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", True),
    # an id that cannot hold "alert-" never gives the alert's topic (a review: refused)
    ("r/{device_id}", "r/alert-{device_id}", r"pump-[0-9]+", False),
    ("anomaly/{device_id}/verdict", "anomaly/{device_id}/alert", r".+", False),
    ("anomaly/{device_id}/verdict", "anomaly/dead-letter", r".+", False),
    # the suffix one has more of ("x" before "-v"): only an id ending in "x" could clash
    ("r/{device_id}x-v", "r/{device_id}-v", r"[a-z]+", True),
    ("r/{device_id}x-v", "r/{device_id}-v", r"[0-9]+", False),
])
def test_result_templates_that_can_give_one_topic_are_found(
    a: str, b: str, pattern: str, overlap: bool
) -> None:
    from daemon.topics import templates_overlap

    assert templates_overlap(a, b, pattern) is overlap
    assert templates_overlap(b, a, pattern) is overlap
