"""The coordinator as a service: the TOML configuration, the systemd unit, and a real
``tessera-coordinator serve --config FILE`` process that a real site enrols with.

The processes are started through the installed command lines (the console scripts ``pip
install .`` makes, which the unit's ``ExecStart`` runs); nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.config import (
    ConfigError,
    CoordinatorConfig,
    DataDir,
    load_plan_with_defaults,
    load_service_config,
)
from coordinator.federation import Federation
from shared.crypto.tls import fingerprint_of_file, generate_self_signed
from shared.errors import PlanError
from shared.identity.invitation import decode_invitation
from shared.plan import demo_plan

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "packaging" / "coordinator.example.toml"
UNIT = ROOT / "packaging" / "tessera-coordinator.service"
BIN = Path(sys.executable).parent
TIMEOUT_S = 60


def _example_for(tmp_path: Path, **replace: str) -> Path:
    """The example configuration with some lines replaced (each must exist verbatim, so a
    change to the example that this test does not know about fails here)."""
    text = EXAMPLE.read_text("utf-8")
    for old, new in replace.items():
        assert text.count(old) == 1, f"{old!r} is not in the example configuration"
        text = text.replace(old, new)
    path = tmp_path / "coordinator.toml"
    path.write_text(text, "utf-8")
    return path


def _loopback(tmp_path: Path, port: int = 0, **more: str) -> Path:
    """The example, made to run here: loopback, data under ``tmp_path``, ``port`` (0: any
    free port, chosen when ``serve`` starts)."""
    return _example_for(
        tmp_path,
        **{
            'data_dir = "/var/lib/tessera-coordinator"': 'data_dir = "data"',
            'host = "0.0.0.0"': 'host = "127.0.0.1"',
            "port = 8443": f"port = {port}",
            'public_url = "wss://coordinator.example.org:8443"': 'public_url = ""',
        },
        **more,
    )


# --- the configuration file ------------------------------------------------------------------


def test_the_example_configuration_reads() -> None:
    service = load_service_config(EXAMPLE)
    assert service.data_dir == Path("/var/lib/tessera-coordinator")
    cfg = service.coordinator
    assert cfg.federation == "Example chest X-ray consortium"
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8443)
    assert cfg.url() == "wss://coordinator.example.org:8443"
    assert (cfg.tls_certificate, cfg.tls_key, cfg.insecure_loopback) == ("", "", False)
    assert cfg.invitation_hours == 72
    assert cfg.plan_defaults() == {"quorum": 2, "min_sites": 3, "round_deadline_s": 1800.0}


def test_relative_paths_are_taken_from_the_files_folder(tmp_path: Path) -> None:
    service = load_service_config(_loopback(tmp_path))
    assert service.data_dir == (tmp_path / "data").resolve()


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("port = 8443", "prot = 8443", r"unknown setting \[network\] prot"),
        ("port = 8443", 'port = "8443"', r"\[network\] port must be a int, not '8443'"),
        ("port = 8443", "port = 70000", r"port must be between 0 and 65535"),
        (
            'public_url = "wss://coordinator.example.org:8443"',
            'public_url = ""',
            r"listens on every address, so invitations need the address sites should dial",
        ),
        (
            'public_url = "wss://coordinator.example.org:8443"',
            'public_url = "https://coordinator.example.org"',
            r"public_url must start with wss://",
        ),
        ('mode = "self-signed"', 'mode = "letsencrypt"', r"mode must be one of self-signed"),
        ('mode = "self-signed"', 'mode = "provided"', r"needs \[tls\] certificate"),
        (
            '# certificate = "/etc/tessera/coordinator-cert.pem"',
            'certificate = "/etc/tessera/coordinator-cert.pem"',
            r"only used with mode = 'provided'",
        ),
        ("quorum = 2", "quorum = -1", r"\[plan_defaults\] quorum must be a whole number >= 0"),
        ("[plan_defaults]", "[plan-defaults]", r"unknown setting plan-defaults"),
        ('federation = "Example chest X-ray consortium"', "", r"federation is missing"),
        ("[tls]", "[tls", r"is not valid TOML"),
    ],
)
def test_mistakes_in_the_file_are_named(tmp_path: Path, old: str, new: str, match: str) -> None:
    path = _example_for(tmp_path, **{old: new})
    with pytest.raises(ConfigError, match=match) as info:
        load_service_config(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the configuration file .*nowhere.toml"):
        load_service_config(tmp_path / "nowhere.toml")


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="needs both its certificate file and its key"):
        CoordinatorConfig(federation="F", tls_certificate="/etc/cert.pem")


def test_the_data_directory_keeps_its_federation_name(tmp_path: Path) -> None:
    service = load_service_config(_loopback(tmp_path))
    Federation.init(service.data_dir, service.coordinator).close()
    paths = DataDir(service.data_dir)
    assert paths.update_config(service.coordinator) is False  # nothing changed
    moved = CoordinatorConfig(**{**_fields(service.coordinator), "port": 9443})
    assert paths.update_config(moved) is True
    assert paths.load_config().port == 9443
    renamed = CoordinatorConfig(**{**_fields(service.coordinator), "federation": "Other"})
    with pytest.raises(ConfigError, match="a federation cannot be renamed") as info:
        paths.update_config(renamed)
    assert info.value.code == "config.federation_mismatch"


def _fields(cfg: CoordinatorConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


# --- TLS: an operator-provided certificate ---------------------------------------------------


def test_a_provided_certificate_is_the_one_invitations_pin(tmp_path: Path) -> None:
    cert, key = tmp_path / "operator" / "cert.pem", tmp_path / "operator" / "key.pem"
    cert.parent.mkdir()
    provided = generate_self_signed(cert, key, hosts=["coordinator.example.org"])
    commented_cert = '# certificate = "/etc/tessera/coordinator-cert.pem"'
    commented_key = '# key = "/etc/tessera/coordinator-key.pem"'
    path = _loopback(
        tmp_path,
        port=8443,
        **{
            'mode = "self-signed"': 'mode = "provided"',
            commented_cert: 'certificate = "operator/cert.pem"',
            commented_key: 'key = "operator/key.pem"',
        },
    )
    service = load_service_config(path)
    assert service.coordinator.tls_certificate == str(cert.resolve())
    Federation.init(service.data_dir, service.coordinator).close()
    fed = Federation.open(service.data_dir)
    try:
        assert fed.paths.tls_cert == cert.resolve()
        own = fingerprint_of_file(service.data_dir / "tls" / "cert.pem")  # made by init, unused
        assert fed.fingerprint() == provided != own
        assert decode_invitation(fed.invite("North Hospital")).fingerprint == provided
    finally:
        fed.close()


# --- plan defaults ---------------------------------------------------------------------------


def _plan_without(tmp_path: Path, *missing: str) -> Path:
    raw = {k: v for k, v in demo_plan().to_dict().items() if k not in missing}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw), "utf-8")
    return path


def test_plan_defaults_fill_what_a_plan_leaves_out(tmp_path: Path) -> None:
    cfg = load_service_config(EXAMPLE).coordinator
    plan = load_plan_with_defaults(
        _plan_without(tmp_path, "quorum", "min_sites", "round_deadline_s"), cfg
    )
    assert (plan.quorum, plan.min_sites, plan.round_deadline_s) == (2, 3, 1800.0)
    stated = load_plan_with_defaults(_plan_without(tmp_path, "min_sites"), cfg)
    assert (stated.quorum, stated.min_sites) == (demo_plan().quorum, 3)  # the plan's own wins


def test_without_defaults_a_plan_must_say(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="quorum"):
        load_plan_with_defaults(
            _plan_without(tmp_path, "quorum"), CoordinatorConfig(federation="F")
        )


# --- the systemd unit ------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text("utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_sandboxes_the_service_and_matches_the_example() -> None:
    unit = _unit_settings()
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "User": "tessera-coordinator",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit.get(key) == [value], key
    service = load_service_config(EXAMPLE)
    assert unit["ReadWritePaths"] == [str(service.data_dir)]
    assert unit["StateDirectory"] == [service.data_dir.name]
    command = unit["ExecStart"][0].split()
    assert command[0].endswith("/bin/tessera-coordinator")
    assert command[1:] == ["serve", "--config", "/etc/tessera/coordinator.toml"]


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd); run 'make system-deps'")
    return tool


def test_the_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    """``verify`` checks that ExecStart exists, so the copy runs the console script installed
    here instead of /opt/tessera-coordinator/venv (where the operator guide installs it)."""
    tool = _systemd_analyze()
    installed = BIN / "tessera-coordinator"
    assert installed.is_file(), "tessera-coordinator is not installed in this environment"
    text = UNIT.read_text("utf-8")
    assert text.count("/opt/tessera-coordinator/venv/bin/tessera-coordinator serve") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(
        text.replace("/opt/tessera-coordinator/venv/bin/tessera-coordinator", str(installed)),
        "utf-8",
    )
    verify = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # systemd's own rating of the sandbox: 0 (locked down) to 100; 20 is shown as "2.0 OK"
    security = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert security.returncode == 0, security.stdout[-2000:]


def test_a_broken_unit_fails_systemd_analyze(tmp_path: Path) -> None:
    """Guard against a verify step that cannot fail."""
    tool = _systemd_analyze()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text("utf-8"), "utf-8")  # ExecStart under /opt: not installed
    verify = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert verify.returncode != 0
    assert "is not executable" in verify.stderr


# --- end to end: serve --config, and a site enrols -------------------------------------------


@pytest.mark.e2e
def test_the_example_configuration_serves_a_site_that_enrols(tmp_path: Path) -> None:
    config = _loopback(tmp_path)
    data = tmp_path / "data"
    log = (tmp_path / "coordinator.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "tessera-coordinator"), "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (data / "serve.port").is_file():
            assert server.poll() is None, (tmp_path / "coordinator.log").read_text()
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.1)
        fed = Federation.open(data)  # what `tessera-coordinator --data-dir DATA invite` does
        try:
            code = fed.invite("North Hospital")
        finally:
            fed.close()
        invitation = decode_invitation(code)
        port = (data / "serve.port").read_text().strip()
        assert invitation.coordinator_url == f"wss://127.0.0.1:{port}"
        assert invitation.federation == "Example chest X-ray consortium"
        enrol = subprocess.run(
            [str(BIN / "tessera-site"), "--data-dir", str(tmp_path / "site"), "enrol", code],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
        )
        assert enrol.returncode == 0, enrol.stderr
        assert "enrolled in Example chest X-ray consortium" in enrol.stdout
        fed = Federation.open(data)
        try:
            assert [s["name"] for s in fed.status()["sites"]] == ["North Hospital"]
            assert fed.config.plan_defaults()["round_deadline_s"] == 1800.0
        finally:
            fed.close()
    finally:
        server.send_signal(signal.SIGTERM)  # what systemctl stop sends
        try:
            code_at_exit = server.wait(timeout=TIMEOUT_S)
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
    assert code_at_exit == 0, (tmp_path / "coordinator.log").read_text()
