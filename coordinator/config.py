"""The coordinator's data directory: configuration, keys, certificate, database, blobs."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import TesseraError


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

    @property
    def config_file(self) -> Path:
        return self.root / "coordinator.json"

    @property
    def signing_key(self) -> Path:
        return self.root / "keys" / "coordinator_ed25519.pem"

    @property
    def tls_cert(self) -> Path:
        return self.root / "tls" / "cert.pem"

    @property
    def tls_key(self) -> Path:
        return self.root / "tls" / "key.pem"

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
