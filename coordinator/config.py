"""The coordinator's settings: its data directory, and the service configuration file.

Two places, one truth. The data directory (``init`` creates it) holds keys, the TLS
certificate, the database and the blobs, and its own copy of the settings,
``coordinator.json``, which every command reads. An operator who runs the coordinator as a
service writes a TOML file instead (``packaging/coordinator.example.toml``, read by
:func:`load_service_config`); ``tessera-coordinator serve --config FILE`` creates the data
directory from it on first start and copies changed settings into ``coordinator.json`` on every
later start, so ``invite``, ``plan add`` and the others see what the service runs with.

TLS is one of two choices. ``self-signed`` (the default): ``init`` makes the coordinator's own
certificate and every invitation code carries its SHA-256 fingerprint, which sites pin; no
certificate authority is involved (see ``shared.crypto.tls``). ``provided``: the operator's
certificate and key files (from the organisation's CA, say) are served instead. Sites still
pin the fingerprint from the invitation, so a renewed certificate needs new invitation codes
for enrolled sites; a long-lived certificate suits this mode best.
"""

from __future__ import annotations

import ipaddress
import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.errors import PlanError, TesseraError
from shared.plan import TrainingPlan


class ConfigError(TesseraError):
    code = "config.invalid"


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    federation: str
    host: str = "127.0.0.1"
    port: int = 8765
    public_url: str = ""  # the address put in invitations; default wss://host:port
    insecure_loopback: bool = False  # plain ws://, refused unless host is a loopback address
    invitation_hours: float = 72.0
    # an operator-provided certificate and key (PEM files); "" for the self-signed one that
    # ``init`` made in the data directory
    tls_certificate: str = ""
    tls_key: str = ""
    # filled into plans that leave them out (``plan add``); 0 means "the plan must say"
    default_quorum: int = 0
    default_min_sites: int = 0
    default_round_deadline_s: float = 0.0

    def url(self) -> str:
        if self.public_url:
            return self.public_url
        scheme = "ws" if self.insecure_loopback else "wss"
        return f"{scheme}://{self.host}:{self.port}"

    def __post_init__(self) -> None:
        if self.insecure_loopback and not _is_loopback(self.host):
            raise ConfigError(
                f"plain ws:// is only allowed on a loopback address, not {self.host}; "
                "remove insecure_loopback to use TLS",
                code="config.insecure",
            )
        if bool(self.tls_certificate) != bool(self.tls_key):
            raise ConfigError(
                "an operator-provided certificate needs both its certificate file and its key "
                "file; give both, or neither to use the self-signed certificate",
                code="config.tls",
            )
        if self.tls_certificate and self.insecure_loopback:
            raise ConfigError(
                "insecure_loopback (plain ws://) and a TLS certificate exclude each other",
                code="config.tls",
            )
        for name in ("default_quorum", "default_min_sites"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a whole number >= 0, not {value!r}")
        deadline = self.default_round_deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, int | float):
            raise ConfigError(f"default_round_deadline_s must be a number, not {deadline!r}")
        if not (math.isfinite(deadline) and deadline >= 0):
            raise ConfigError(f"default_round_deadline_s must be >= 0, not {deadline!r}")

    def plan_defaults(self) -> dict[str, Any]:
        """The plan fields this coordinator fills in when a plan file leaves them out."""
        defaults: dict[str, Any] = {
            "quorum": self.default_quorum,
            "min_sites": self.default_min_sites,
            "round_deadline_s": float(self.default_round_deadline_s),
        }
        return {k: v for k, v in defaults.items() if v}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class DataDir:
    root: Path
    # an operator-provided certificate and key, served instead of the self-signed pair
    certificate: Path | None = None
    certificate_key: Path | None = None

    def for_config(self, config: CoordinatorConfig) -> DataDir:
        """These paths with the certificate that ``config`` chose."""
        if not config.tls_certificate:
            return replace(self, certificate=None, certificate_key=None)
        return replace(
            self,
            certificate=Path(config.tls_certificate),
            certificate_key=Path(config.tls_key),
        )

    @property
    def config_file(self) -> Path:
        return self.root / "coordinator.json"

    @property
    def signing_key(self) -> Path:
        return self.root / "keys" / "coordinator_ed25519.pem"

    @property
    def tls_cert(self) -> Path:
        return self.certificate or self.root / "tls" / "cert.pem"

    @property
    def tls_key(self) -> Path:
        return self.certificate_key or self.root / "tls" / "key.pem"

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def port_file(self) -> Path:
        """Written by ``serve`` with the port actually bound (tests and the demo use port 0)."""
        return self.root / "serve.port"

    def load_config(self) -> CoordinatorConfig:
        try:
            raw = json.loads(self.config_file.read_text("utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{self.root} is not a coordinator data directory; run "
                f"'tessera-coordinator init --data-dir {self.root}' first",
                code="config.missing",
            ) from exc
        except ValueError as exc:
            raise ConfigError(f"{self.config_file} is not valid JSON: {exc}") from exc
        try:
            return CoordinatorConfig(**raw)
        except TypeError as exc:
            raise ConfigError(f"{self.config_file}: {exc}") from exc

    def save_config(self, config: CoordinatorConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(asdict(config), indent=2) + "\n", "utf-8")

    def update_config(self, config: CoordinatorConfig) -> bool:
        """Take ``config`` (from the service file) as this directory's settings; returns
        whether anything changed. The federation's name is fixed once it exists: sites have
        signed it."""
        current = self.load_config()
        if current.federation != config.federation:
            raise ConfigError(
                f"{self.root} holds the federation {current.federation!r}, but the "
                f"configuration names {config.federation!r}; a federation cannot be renamed, "
                "so correct the name in the configuration file (or point data_dir elsewhere)",
                code="config.federation_mismatch",
            )
        if current == config:
            return False
        self.save_config(config)
        return True


# --- the service configuration file (TOML) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """What ``serve --config FILE`` runs: the data directory and the settings for it."""

    path: Path  # the file it was read from
    data_dir: Path
    coordinator: CoordinatorConfig


# section -> key -> (CoordinatorConfig field, expected types); "" is the top level
_TOML_KEYS: dict[str, dict[str, tuple[str, tuple[type, ...]]]] = {
    "": {"federation": ("federation", (str,)), "data_dir": ("", (str,))},
    "network": {
        "host": ("host", (str,)),
        "port": ("port", (int,)),
        "public_url": ("public_url", (str,)),
    },
    "tls": {
        "mode": ("", (str,)),
        "certificate": ("tls_certificate", (str,)),
        "key": ("tls_key", (str,)),
    },
    "invitations": {"valid_hours": ("invitation_hours", (int, float))},
    "plan_defaults": {
        "quorum": ("default_quorum", (int,)),
        "min_sites": ("default_min_sites", (int,)),
        "round_deadline_s": ("default_round_deadline_s", (int, float)),
    },
}
TLS_MODES = ("self-signed", "provided")


def _where(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def load_service_config(path: Path) -> ServiceConfig:
    """Read and check a coordinator configuration file (TOML, see
    ``packaging/coordinator.example.toml``). Unknown keys are refused, so a misspelt setting
    cannot be silently ignored; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read the configuration file {path}: {exc.strerror}", code="config.file"
        ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc

    def bad(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    values: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for section, keys in _TOML_KEYS.items():
        table = raw if not section else raw.get(section, {})
        if not isinstance(table, dict):
            raise bad(f"[{section}] must be a table")
        for key, value in table.items():
            if not section and isinstance(value, dict) and key in _TOML_KEYS:
                continue
            if key not in keys:
                known = ", ".join(_where(section, k) for k in keys)
                raise bad(f"unknown setting {_where(section, key)} (known here: {known})")
            field_name, types = keys[key]
            if isinstance(value, bool) or not isinstance(value, types):
                kind = " or ".join(t.__name__ for t in types)
                raise bad(f"{_where(section, key)} must be a {kind}, not {value!r}")
            found[f"{section}.{key}"] = value
            if field_name:
                values[field_name] = value
    for key in ("federation", "data_dir"):
        if not found.get(f".{key}"):
            raise bad(f"{key} is missing")

    mode = found.get("tls.mode", "self-signed")
    if mode not in TLS_MODES:
        raise bad(f"[tls] mode must be one of {', '.join(TLS_MODES)}, not {mode!r}")
    if mode == "provided":
        for key in ("certificate", "key"):
            if not found.get(f"tls.{key}"):
                raise bad(f"[tls] mode = 'provided' needs [tls] {key} (a PEM file)")
            values[f"tls_{key}"] = str(_resolve(path, found[f"tls.{key}"]))
    elif found.get("tls.certificate") or found.get("tls.key"):
        raise bad("[tls] certificate and key are only used with mode = 'provided'")

    port = values.get("port", 8765)
    if not 0 <= port <= 65535:
        raise bad(f"[network] port must be between 0 and 65535, not {port}")
    host = values.get("host", "127.0.0.1")
    if _is_wildcard(host) and not values.get("public_url"):
        raise bad(
            f"[network] host = {host!r} listens on every address, so invitations need the "
            "address sites should dial: set [network] public_url (wss://name:port)"
        )
    public_url = values.get("public_url", "")
    if public_url and not public_url.startswith("wss://"):
        raise bad(f"[network] public_url must start with wss://, not {public_url!r}")
    known_fields = {f.name for f in fields(CoordinatorConfig)}
    assert set(values) <= known_fields, set(values) - known_fields
    try:
        coordinator = CoordinatorConfig(**values)
    except ConfigError as exc:  # name the setting as the file spells it
        message = exc.message
        for section, keys in _TOML_KEYS.items():
            for key, (field_name, _) in keys.items():
                if field_name and field_name != key:
                    message = message.replace(field_name, _where(section, key))
        raise ConfigError(f"{path}: {message}", code=exc.code) from exc
    return ServiceConfig(
        path=path, data_dir=_resolve(path, found[".data_dir"]), coordinator=coordinator
    )


def _resolve(config_file: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (config_file.parent / candidate).resolve()


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


# --- plan defaults ---------------------------------------------------------------------------


def load_plan_with_defaults(path: Path, config: CoordinatorConfig) -> TrainingPlan:
    """A plan file, with the coordinator's quorum and deadline defaults filled in where the
    file leaves them out (``shared.plan.load_plan`` otherwise: same checks, same errors)."""
    defaults = config.plan_defaults()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PlanError(
            f"Cannot read plan file {str(path)!r} ({exc.strerror or exc}). "
            "Check the path and its permissions.",
            code="plan.unreadable",
        ) from exc
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PlanError(
            f"Plan file {str(path)!r} is not valid UTF-8 JSON ({exc}). Fix the file.",
            code="plan.invalid",
        ) from exc
    if isinstance(raw, dict):
        raw = {**defaults, **raw}
    return TrainingPlan.from_dict(raw)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number JSON allows")
