"""Releases on the wire: only the sites that took part receive a release, the site keeps it
only after verifying it (an altered one is refused through the real download path), and its
signed acceptance is logged, checked by the bundle verifier and shown by the report."""

# ruff: noqa: F811 (the fixtures of test_server.py are imported by name)
from __future__ import annotations

import hashlib
import json

import pytest

from coordinator.export import export_run
from coordinator.release import acceptances, make_release, release_files
from shared import releases as layout
from shared.errors import ReleaseError
from shared.protocol.messages import (
    ErrorMessage,
    ReleaseNotice,
    RunFinished,
    TransferAccept,
    UpdateAccepted,
    Welcome,
)
from shared.releases import pack_release, unpack_release
from shared.tensors import encode_tensors
from site_client.core import releases as site_releases
from site_client.core.governance import SiteGovernance
from site_client.core.governance_link import GovernanceLink
from site_client.core.release_view import decide
from tests.coordinator.test_server import (  # a running coordinator and the rogue site
    Joined,
    enrol_site,
    fed,  # noqa: F401 (fixture)
    join,
    rogue,
    run_id,  # noqa: F401 (fixture)
    server,  # noqa: F401 (fixture)
    site,  # noqa: F401 (fixture)
    small_deltas,
    upload,
)

pytestmark = pytest.mark.timeout(30)


def _link(site) -> GovernanceLink:
    record = SiteGovernance(
        site.site_dir.governance_db,
        federation=site.config.federation,
        site_id=site.site_id,
        coordinator_key=site.config.coordinator_key,
    )
    return GovernanceLink(record, site.config, site.key)


async def _finish_run(j: Joined) -> None:
    data = encode_tensors(small_deltas(j.model, seed=1))
    assert isinstance(await upload(j, data, "u-1"), UpdateAccepted)
    await j.conn.expect(RunFinished)


async def _receive(conn, offer) -> bytes:
    data, _ = await conn.download(offer)
    return data


def test_a_pack_holds_only_release_files_and_round_trips() -> None:
    files = {layout.MANIFEST: b"{}", layout.WEIGHTS: b"w" * 100}
    data = pack_release(files)
    assert unpack_release(data) == files and pack_release(dict(reversed(files.items()))) == data
    with pytest.raises(ReleaseError, match="not a file of a release"):
        pack_release({"../etc/passwd": b"x"})
    with pytest.raises(ReleaseError, match="do not fill the payload"):
        unpack_release(data + b"x")
    evil = data.replace(b'"release.json"', b'"../x/evil.js"')
    with pytest.raises(ReleaseError, match="names files a release does not have"):
        unpack_release(evil)


async def test_a_release_reaches_only_participants_and_its_acceptance_is_logged(
    fed, site, run_id, tmp_path
) -> None:
    async with rogue(fed) as conn:
        j = await join(fed, site, conn)
        await _finish_run(j)
        make_release(fed, run_id, "1.0", now=5000.0)
        notice = await conn.expect(ReleaseNotice)
        # A site enrolled after the run (so it took no part) connects.
        outsider = await enrol_site(fed, tmp_path, "Site B")
        outsider_conn = rogue(fed)
        other = await outsider_conn.__aenter__()
        await other.authenticate(outsider.site_id, outsider.key)
        await other.expect(Welcome)
        ((version, rid, offer),) = notice.offers()
        assert (version, rid) == ("1.0", run_id)
        assert offer.sha256 == hashlib.sha256(pack_release(release_files(fed, "1.0"))).hexdigest()
        # The outsider is told of no release, and a direct request for it is refused.
        assert (await other.expect(ReleaseNotice)).releases == []
        await other.expect(RunFinished)  # every site hears the run is over
        await other.send(TransferAccept(transfer_id=offer.transfer_id, next_index=0))
        refused = await other.expect(ErrorMessage)
        assert refused.code == "release.not_participant" and "took part" in refused.message

        data = await _receive(conn, offer)
        link = _link(site)
        download = site_releases.ReleaseDownload(version, rid, offer, tmp_path / "x.part")
        verified = site_releases.install(site.site_dir, link, download, data, 6000.0)
        assert verified.root == site_releases.release_dir(site.site_dir, "1.0")
        assert site_releases.held(site.site_dir) == ["1.0"]
        assert not site_releases.wanted(site.site_dir, link, "1.0", offer)
        metrics = dict(auc=0.8, accuracy=0.7, sensitivity=0.6, specificity=0.9, loss=0.5, n=12)
        message = site_releases.acceptance(link, verified, metrics, 6001.0)
        await conn.send(message)
        await conn.send(message)  # a resend after a reconnect changes nothing
        for _ in range(50):
            if fed.store.events("release_accepted"):
                break
            await __import__("asyncio").sleep(0.05)
        (event,) = fed.store.events("release_accepted")
        assert event["detail"]["site_id"] == site.site_id and event["detail"]["accepted"] is True
        ((row),) = acceptances(fed.store)
        assert (row["version"], row["accepted"], row["metrics"]["auc"]) == ("1.0", True, 0.8)
        # Later a person at the site refuses it (the app's or the CLI's path): the signed
        # refusal replaces the automatic verdict in the coordinator's record and report.
        refusal = decide(
            site.site_dir, "1.0", accepted=False, person="Dr. Byron", reason="too weak here"
        )
        await conn.send(refusal)
        for _ in range(50):
            if len(fed.store.events("release_accepted")) == 2:
                break
            await __import__("asyncio").sleep(0.05)
        ((row),) = acceptances(fed.store)
        assert (row["accepted"], row["reason"], row["person"]) == (
            False,
            "too weak here",
            "Dr. Byron",
        )
        report = (export_run(fed, run_id, tmp_path / "bundle").out / "report.html").read_text()
        assert "too weak here" in report and "Dr. Byron" in report
        # A forged acceptance (the outsider signing for the release) is refused.
        await other.send(site_releases.acceptance(_link(outsider), verified, metrics, 6002.0))
        assert (await other.expect(ErrorMessage)).code == "release.not_participant"
        link.record.close()
        await outsider_conn.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("alter", "code"),
    [
        ("signature", "release.bad_signature"),
        ("weights", "release.weights_mismatch"),
        ("tree_head", "release.bad_tree_head"),
    ],
)
async def test_an_altered_release_is_refused_after_the_real_download(
    server, fed, site, run_id, tmp_path, alter, code
) -> None:
    async with rogue(fed) as conn:
        j = await join(fed, site, conn)
        await _finish_run(j)
        make_release(fed, run_id, "1.0", now=5000.0)
        notice = await conn.expect(ReleaseNotice)
        ((version, rid, offer),) = notice.offers()
        # The coordinator's copy is altered after the offer was made (same transfer id).
        files = dict(unpack_release(server._release_packs[offer.transfer_id][2].data))
        if alter == "signature":
            manifest = json.loads(files[layout.MANIFEST])
            manifest["signature"] = manifest["signature"][:-4] + "AAA="
            files[layout.MANIFEST] = layout.json_bytes(manifest)
        elif alter == "weights":
            w = bytearray(files[layout.WEIGHTS])
            w[-1] ^= 1
            files[layout.WEIGHTS] = bytes(w)
        else:
            prov = json.loads(files[layout.PROVENANCE])
            prov["tree_head"]["root"] = "00" * 32
            files[layout.PROVENANCE] = layout.json_bytes(prov)
        altered = pack_release(files)
        pack = server._release_packs[offer.transfer_id][2]
        sha = hashlib.sha256(altered).hexdigest()
        from shared.protocol.transfer import make_offer

        new = make_offer(offer.transfer_id, altered, offer.chunk_size, sha256=sha)
        server._release_packs[offer.transfer_id] = (version, rid, type(pack)(0, altered, new, ""))
        data = await _receive(conn, new)
        link = _link(site)
        download = site_releases.ReleaseDownload(version, rid, new, tmp_path / "x.part")
        with pytest.raises(ReleaseError, match="Do not use this release") as info:
            site_releases.install(site.site_dir, link, download, data, 6000.0)
        assert info.value.code == code
        assert site_releases.held(site.site_dir) == []
        assert not site_releases.wanted(site.site_dir, link, version, new)
        (note,) = [a for a in link.record.activity() if a["kind"] == "release_rejected"]
        assert note["detail"]["code"] == code
        link.record.close()
