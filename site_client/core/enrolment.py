"""Enrolment: redeem an invitation code once, over the pinned TLS channel.

The site's Ed25519 key pair is made here, on the site's machine; only the public key is
sent. The key file is written only after the coordinator accepted the enrolment, so a failed
attempt leaves nothing half-done behind. The whole exchange has a deadline: a coordinator that
accepts the connection and then says nothing fails the attempt with ``net.timeout``.
"""

from __future__ import annotations

import asyncio
import time

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.signing import sign
from shared.crypto.tls import connect_pinned
from shared.errors import ConnectionFailed, IdentityError, InvitationError
from shared.identity.invitation import decode_invitation, is_expired
from shared.protocol import signed
from shared.protocol.messages import Challenge, ErrorMessage, Welcome
from shared.protocol.session import Closed, MessageReceived, SiteSession
from site_client.core.config import SiteConfig, SiteDir

OPEN_TIMEOUT_S = 15.0
EXCHANGE_TIMEOUT_S = 60.0  # connect, challenge, answer and welcome, all together


async def enrol(
    code: str,
    site_dir: SiteDir,
    site_name: str | None = None,
    now: float | None = None,
    *,
    timeout_s: float = EXCHANGE_TIMEOUT_S,
) -> SiteConfig:
    """Redeem ``code`` and save the site's identity in ``site_dir``."""
    now = time.time() if now is None else now
    invitation = decode_invitation(code)
    if is_expired(invitation, now):
        raise InvitationError(
            "This invitation code has expired. Ask the consortium lead for a new code.",
            code="identity.invitation_expired",
        )
    if site_dir.is_enrolled():
        raise IdentityError(
            f"{site_dir.root} already holds an enrolled site; use another data directory",
            code="identity.already_enrolled",
        )
    key = generate_signing_key()
    public_key = public_key_b64(key)
    name = site_name or "Site"
    session = SiteSession()
    welcome: Welcome | None = None
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        async with (
            asyncio.timeout_at(deadline),
            connect_pinned(
                invitation.coordinator_url, invitation.fingerprint, open_timeout=OPEN_TIMEOUT_S
            ) as ws,
        ):
            async for frame in ws:
                session.receive_frame(frame)
                closed: Closed | None = None
                for event in session.events_received():
                    if isinstance(event, MessageReceived):
                        msg = event.message
                        if isinstance(msg, Challenge):
                            signature = sign(
                                key,
                                signed.ENROL,
                                signed.enrol_fields(
                                    nonce=msg.nonce,
                                    token=invitation.token,
                                    public_key=public_key,
                                    site_name=name,
                                    fingerprint=invitation.fingerprint,
                                ),
                            )
                            session.enrol(
                                token=invitation.token,
                                site_name=name,
                                public_key=public_key,
                                signature=signature,
                            )
                        elif isinstance(msg, Welcome):
                            welcome = msg
                        elif isinstance(msg, ErrorMessage) and msg.fatal:
                            raise InvitationError(msg.message, code=msg.code)
                    elif isinstance(event, Closed):
                        # A peer's fatal error comes after the Closed it causes: report that.
                        closed = event
                if closed is not None:
                    raise IdentityError(f"enrolment failed: {closed.reason}", code=closed.code)
                for data in session.data_to_send():
                    await ws.send(data)
                if welcome is not None:
                    break
    except TimeoutError as exc:
        if asyncio.get_running_loop().time() < deadline:  # the connection's own open timeout
            raise _unreachable(invitation.coordinator_url, exc) from exc
        raise ConnectionFailed(
            f"The coordinator at {invitation.coordinator_url} did not complete the enrolment "
            f"within {timeout_s:.0f} s. Nothing was saved; try again later, and if it "
            "repeats, tell the consortium lead.",
            code="net.timeout",
        ) from exc
    except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
        raise _unreachable(invitation.coordinator_url, exc) from exc
    if welcome is None:
        raise IdentityError("the coordinator closed the connection during enrolment")
    config = SiteConfig(
        site_id=welcome.site_id,
        site_name=welcome.site_name,
        federation=welcome.federation,
        coordinator_url=invitation.coordinator_url,
        fingerprint=invitation.fingerprint,
        coordinator_key=welcome.coordinator_key,
        enrolled_at=now,
    )
    site_dir.ensure()
    save_private_key(key, site_dir.key_file, overwrite=True)
    site_dir.save(config)
    return config


def _unreachable(url: str, exc: BaseException) -> ConnectionFailed:
    return ConnectionFailed(
        f"Cannot reach the coordinator at {url} ({exc}). Check the network connection and "
        "that outbound connections to that address are allowed, then try again.",
        code="net.unreachable",
    )
