"""Operator actions on a federation's data directory: init, invite, plans, runs, status.

The admin CLI and the server share this one place, so an operator action means the same
thing whichever door it comes through. Every change is one database transaction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.blobs import BlobStore
from coordinator.config import ConfigError, CoordinatorConfig, DataDir
from coordinator.heterogeneity import scanner_shift
from coordinator.store import RunRecord, Store
from coordinator.store_governance import CharterRecord
from shared.crypto.keys import (
    generate_signing_key,
    load_private_key,
    public_key_b64,
    save_private_key,
)
from shared.crypto.signing import sign
from shared.crypto.tls import fingerprint_of_file, generate_self_signed
from shared.errors import GovernanceError, PlanError
from shared.governance.charter import charter_hash, check_charter_text
from shared.identity.invitation import Invitation, encode_invitation, new_token, token_digest
from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import TrainingPlan
from shared.protocol import signed
from shared.tensors import encode_tensors


@dataclass
class Federation:
    paths: DataDir
    config: CoordinatorConfig
    store: Store
    blobs: BlobStore

    @classmethod
    def open(cls, root: Path) -> Federation:
        paths = DataDir(Path(root))
        config = paths.load_config()
        paths = paths.for_config(config)  # an operator-provided TLS certificate, if chosen
        store = Store(paths.database, head_key=load_private_key(paths.signing_key))
        return cls(paths, config, store, BlobStore(paths.blobs))

    @classmethod
    def init(cls, root: Path, config: CoordinatorConfig, now: float | None = None) -> Federation:
        paths = DataDir(Path(root))
        if paths.config_file.exists():
            raise ConfigError(
                f"{root} already holds a federation; choose another --data-dir",
                code="config.exists",
            )
        paths.save_config(config)
        paths.signing_key.parent.mkdir(parents=True, exist_ok=True)
        paths.tls_cert.parent.mkdir(parents=True, exist_ok=True)
        key = generate_signing_key()
        save_private_key(key, paths.signing_key)
        hosts = sorted({config.host, "localhost", "127.0.0.1"})
        generate_self_signed(paths.tls_cert, paths.tls_key, hosts=hosts)
        fed = cls(paths, config, Store(paths.database, head_key=key), BlobStore(paths.blobs))
        fed.store.set_meta("federation", config.federation)
        with fed.store.transaction():
            fed.store.log(
                "federation_created",
                now or time.time(),
                federation=config.federation,
                public_key=public_key_b64(key),
            )
        return fed

    def close(self) -> None:
        self.store.close()

    # -- identity ------------------------------------------------------------------------

    def signing_key(self):  # -> Ed25519PrivateKey
        return load_private_key(self.paths.signing_key)

    def public_key(self) -> str:
        return public_key_b64(self.signing_key())

    def url(self) -> str:
        """The address for invitations; with port 0, the port ``serve`` actually bound."""
        cfg = self.config
        if cfg.port == 0 and not cfg.public_url and self.paths.port_file.is_file():
            scheme = "ws" if cfg.insecure_loopback else "wss"
            return f"{scheme}://{cfg.host}:{self.paths.port_file.read_text().strip()}"
        return cfg.url()

    def fingerprint(self) -> str:
        return (
            "insecure"
            if self.config.insecure_loopback
            else fingerprint_of_file(self.paths.tls_cert)
        )

    def invite(self, site_name: str, now: float | None = None, hours: float | None = None) -> str:
        now = time.time() if now is None else now
        token = new_token()
        expires = int(now + 3600 * (hours if hours is not None else self.config.invitation_hours))
        invitation = Invitation(
            coordinator_url=self.url(),
            fingerprint=self.fingerprint(),
            token=token,
            federation=self.config.federation,
            expires_at=expires,
        )
        self.store.add_invitation(token_digest(token), site_name, now, expires)
        return encode_invitation(invitation)

    # -- charter -------------------------------------------------------------------------

    def publish_charter(self, data: bytes, now: float | None = None) -> CharterRecord:
        """Check, sign and publish the next charter version; sites must sign it to take part."""
        text = check_charter_text(data)
        current = self.store.charter()
        if current is not None and current.sha256 == charter_hash(text):
            raise GovernanceError(
                f"this text is already charter version {current.version}; edit it before "
                "publishing a new version",
                code="governance.charter_unchanged",
            )
        version = (current.version if current else 0) + 1
        sha = charter_hash(text)
        signature = sign(
            self.signing_key(),
            signed.CHARTER,
            signed.charter_fields(federation=self.config.federation, version=version, sha256=sha),
        )
        self.store.publish_charter(
            version, text, sha, signature, time.time() if now is None else now
        )
        record = self.store.charter(version)
        assert record is not None
        return record

    # -- plans and runs ------------------------------------------------------------------

    def add_plan(self, plan: TrainingPlan, now: float | None = None) -> str:
        plan_hash = plan.plan_hash
        signature = sign(self.signing_key(), signed.PLAN, signed.plan_fields(plan_hash=plan_hash))
        self.store.add_plan(
            plan_hash,
            plan.name,
            plan.canonical_json().decode("utf-8"),
            signature,
            time.time() if now is None else now,
        )
        return plan_hash

    def plan(self, plan_hash: str) -> TrainingPlan:
        row = self.store.plan(plan_hash)
        if row is None:
            matches = [
                p
                for p in self.store.plans()
                if len(plan_hash) >= 8 and p["plan_hash"].startswith(plan_hash)
            ]
            if len(matches) != 1:
                raise PlanError(
                    f"no registered plan {plan_hash!r}; 'tessera-coordinator plan list' shows them",
                    code="plan.unknown",
                )
            row = matches[0]
        return TrainingPlan.from_dict(json.loads(row["json"]))

    def start_run(self, plan_hash: str, now: float | None = None) -> RunRecord:
        plan = self.plan(plan_hash)
        active = self.store.active_run()
        if active is not None:
            raise ConfigError(
                f"run {active.run_id} is still running; wait for it to finish",
                code="run.busy",
            )
        model = build_model(
            plan.architecture,
            plan.architecture_version,
            input_size=plan.input_size,
            params=plan.architecture_params,
            seed=plan.seed,
        )
        digest = self.blobs.put(encode_tensors(model_arrays(model)))
        return self.store.create_run(plan.plan_hash, digest, time.time() if now is None else now)

    def status(self) -> dict[str, Any]:
        summaries = self.store.site_summaries()
        runs = []
        for run in self.store.runs():
            rounds = self.store.rounds(run.run_id)
            runs.append(
                {
                    "run_id": run.run_id,
                    "plan_hash": run.plan_hash,
                    "status": run.status,
                    "current_round": run.current_round,
                    "model": run.model_digest,
                    "rounds": [
                        {
                            "round": r["round"],
                            "status": r["status"],
                            "attempt": r["attempt"],
                            "updates": r["n_updates"],
                            "mean_loss": r["mean_loss"],
                            "model": r["model_out"],
                        }
                        for r in rounds
                    ],
                }
            )
        return {
            "federation": self.config.federation,
            "address": self.config.url(),
            "fingerprint": self.fingerprint(),
            "sites": [{"site_id": s.site_id, "name": s.name} for s in self.store.sites()],
            "plans": [{"plan_hash": p["plan_hash"], "name": p["name"]} for p in self.store.plans()],
            "runs": runs,
            "rejected_updates": len(self.store.rejections()),
            "site_data_summaries": summaries,
            "scanner_shift": scanner_shift(summaries).to_dict(),
        }
