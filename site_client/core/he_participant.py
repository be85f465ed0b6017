"""The participant's I/O for homomorphically encrypted runs (``SiteHEKeys`` over the link).

Theory of operation: ``Participant`` hands every ``he_*`` message to one ``HEKeys`` (a
one-line hook) and asks it, before a round of a plan with ``homomorphic`` trains, where the
run's CKKS key is (``wait_key``). The key is set up once per run: this site answers the
coordinator's signed request with a fresh X25519 key; the key site makes the CKKS key and
seals it to every other site; each site opens its sealed copy and acknowledges the key's id.
The secret context is kept at the site (``he/RUN.ckks``, readable by its user only) and given
to the training worker by path: the worker decrypts each round's global model with it and
encrypts the local model it uploads (``shared.privacy.he_rounds``). It never leaves the site.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import TesseraError
from shared.protocol.messages import HEKeyDirectory, HEKeyRequest, HESealedKey, Message
from site_client.core.he_keys_site import SiteHEKeys

if TYPE_CHECKING:
    from site_client.core.participant import Participant

log = logging.getLogger("tessera.site.he")


def key_path(root: Path, run_id: str) -> Path:
    """Where the site keeps a run's secret CKKS context."""
    return root / "he" / f"{run_id}.ckks"


class HEKeys:
    def __init__(self, participant: Participant) -> None:
        self.p = participant
        self._attempt: SiteHEKeys | None = None
        self._held: dict[str, asyncio.Event] = {}

    def path(self, run_id: str) -> Path:
        return key_path(self.p.dir.root, run_id)

    async def on_message(self, msg: Message) -> None:
        p = self.p
        try:
            out = self._handle(msg)
        except TesseraError as exc:
            p.on_status(f"encryption key: {msg.TYPE} refused [{exc.code}]: {exc}")
            log.warning("HE key: %s refused: %s (%s)", msg.TYPE, exc, exc.code)
            return
        if p._session is not None and not p._session.closed:
            for message in out:
                p._session.send(message)

    def _handle(self, msg: Message) -> list[Message]:
        p = self.p
        if isinstance(msg, HEKeyRequest):
            self._attempt = SiteHEKeys(
                site_id=p.config.site_id,
                signing_key=p.key,
                coordinator_key=p.config.coordinator_key,
            )
            p.on_status(f"run {msg.run_id}: setting up the shared encryption key")
            return [self._attempt.on_request(msg)]
        attempt = self._attempt
        if attempt is None:
            return []  # nothing asked for: SiteHEKeys would refuse it as unexpected
        if isinstance(msg, HEKeyDirectory):
            sealed: list[Message] = list(attempt.on_directory(msg))
            self._keep(msg.run_id, attempt)
            return sealed
        if isinstance(msg, HESealedKey):
            ack = attempt.on_sealed_key(msg)
            self._keep(msg.run_id, attempt)
            return [ack]
        return []

    def _keep(self, run_id: str, attempt: SiteHEKeys) -> None:
        secret = attempt.secret_context
        if secret is None:
            return
        path = self.path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._held.setdefault(run_id, asyncio.Event()).set()
        self.p.on_status(f"run {run_id}: this site holds the shared encryption key")

    async def wait_key(self, run_id: str, timeout_s: float) -> Path | None:
        """The run's key file, once this site holds it; ``None`` after ``timeout_s``."""
        path = self.path(run_id)
        if path.is_file():
            return path
        held = self._held.setdefault(run_id, asyncio.Event())
        try:
            await asyncio.wait_for(held.wait(), timeout_s)
        except TimeoutError:
            return None
        return path if path.is_file() else None
