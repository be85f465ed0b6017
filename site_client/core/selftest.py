"""``tessera-site --self-test``: proof that this installed copy of the site app works here.

Theory of operation
-------------------
A packaged app fails in ways the source tree never does: a native library or a plugin left
out of the bundle, a module imported only by name (pydicom's decoders, pylibjpeg's entry
points), a child process started as ``python -m`` where there is no ``python``. So the
self-test walks the paths a site really takes, on synthetic data, in a temporary folder that
is deleted afterwards (the site's own data folder is never touched, and nothing is sent
anywhere: the two network checks talk to this computer only, on loopback):

==================  ==========================================================================
``modules``         the libraries the app loads, with their versions (torch must be the CPU
                    build)
``site database``   a fresh study index (SQLite) in the temporary folder
``dicom import``    synthetic DICOM files (``shared.synthetic``; no real patient) imported into
                    that index and labelled, as ``tessera-site import`` does
``dicom decoders``  RLE and JPEG 2000 round trips (pylibjpeg-rle, pylibjpeg-openjpeg) and two
                    of pydicom's own JPEG and JPEG-LS test files (pylibjpeg-libjpeg), decoded
                    through ``shared.dicom_pixels`` like every imported image
``training``        a few optimiser steps of ``small_cnn`` on random images (``shared.training``)
``training process``  one training job in the separate, cancellable training process
                    (``site_client.core.trainer``) on the imported images: the path of a round
``model registry``  MONAI's DenseNet-121 from the model registry
``secure connection``  a TLS 1.3 websocket on loopback with a pinned self-signed certificate,
                    as the site's link to the coordinator
``dicom network``   a C-ECHO between two pynetdicom application entities on loopback, as the
                    PACS receiver uses
==================  ==========================================================================

Callers add their own checks (the command line adds ``main window`` from
:mod:`site_client.gui.selftest`, so that this module stays free of Qt). Every check runs even
when an earlier one failed, except that a check which needs an earlier result reports what it
was waiting for. The report ends with one line naming every failed check; the process exit
status is 0 only when none failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import logging
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

__all__ = [
    "CHECKS",
    "PYDICOM_TEST_FILES",
    "CheckResult",
    "SelfTestContext",
    "SelfTestReport",
    "Skipped",
    "run_self_test",
]

#: pydicom's own test files that the self-test decodes (shipped in pydicom's wheel and copied
#: into the bundle; read with ``download=False``, never fetched): a greyscale JPEG (extended,
#: 12-bit), and a JPEG-LS lossless copy of ``MR_small.dcm`` that must decode to exactly the
#: same pixels.
PYDICOM_TEST_FILES = (
    "JPGExtended.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small.dcm",
)

#: What the app imports: the check fails when any of these cannot be imported.
MODULES = (
    "numpy",
    "torch",
    "pydicom",
    "pylibjpeg",
    "libjpeg",
    "openjpeg",
    "rle",
    "pynetdicom",
    "websockets",
    "cryptography",
    "safetensors",
    "sqlite_utils",
    "zstandard",
    "shared.protocol.session",
    "shared.privacy.secagg",
    "site_client.core.enrolment",
    "site_client.core.participant",
    "site_client.core.intake.importer",
    "site_client.core.intake.pacs",
    "site_client.core.train_worker",
)

#: Distributions whose versions the report shows.
VERSIONS = ("torch", "numpy", "pydicom", "pynetdicom", "websockets", "cryptography")

IMAGES = 12  # synthetic images imported; a few optimiser steps at batch size 4
IMAGE_SIZE = 32  # the smallest input the registry's models take
TIMEOUT_S = 120.0  # for the child process and the loopback peers; normally a few seconds


class Skipped(Exception):
    """Raised by a check that does not apply here (its message says why)."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Literal["ok", "skipped", "FAIL"]
    detail: str
    seconds: float

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass(frozen=True, slots=True)
class SelfTestReport:
    results: tuple[CheckResult, ...]

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results if r.failed)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        if self.ok:
            n = len(self.results)
            return f"self-test passed: {n} check{'' if n == 1 else 's'}"
        return f"self-test FAILED: {', '.join(self.failed)}"


@dataclass
class SelfTestContext:
    """The temporary folder and what earlier checks left for later ones."""

    work: Path
    site_dir: Any = None  # site_client.core.config.SiteDir, once the database check ran
    imported: int = 0  # labelled images in the index, once the import check ran
    first_dicom: Path | None = None

    def need(self, what: str, value: Any) -> Any:
        if not value:
            raise RuntimeError(f"not run: needs the {what} check, which failed")
        return value


Check = tuple[str, Callable[[SelfTestContext], str]]


# --- the checks ------------------------------------------------------------------------------


def check_modules(ctx: SelfTestContext) -> str:
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or a native library that fails to load
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        raise RuntimeError("cannot import " + "; ".join(missing))
    import torch

    if torch.version.cuda is not None:
        raise RuntimeError(f"torch {torch.__version__} is a CUDA build; the site needs CPU only")
    versions = []
    for dist in VERSIONS:
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:  # a bundle without its metadata
            module = importlib.import_module(dist)
            versions.append(f"{dist} {getattr(module, '__version__', '?')}")
    return f"{len(MODULES)} modules; " + ", ".join(versions)


def check_site_database(ctx: SelfTestContext) -> str:
    import sqlite3

    from site_client.core.config import SiteDir

    site_dir = SiteDir(ctx.work / "site")
    index = site_dir.open_index()
    try:
        tables = set(index.db.table_names())
    finally:
        index.close()
    for table in ("meta", "studies"):
        if table not in tables:
            raise RuntimeError(f"the fresh study index has no {table!r} table")
    index = site_dir.open_index()  # opens again: the schema migration is idempotent
    index.close()
    ctx.site_dir = site_dir
    return f"fresh study index, {len(tables)} tables, SQLite {sqlite3.sqlite_version}"


def check_dicom_import(ctx: SelfTestContext) -> str:
    from shared.synthetic import generate_federation
    from site_client.core.intake.importer import import_folder
    from site_client.core.intake.labels import attach_labels

    site_dir = ctx.need("site database", ctx.site_dir)
    fed = generate_federation(
        ctx.work / "synthetic",
        sites=1,
        seed=3,
        images_per_site=[IMAGES],
        test_images=0,
        image_size=IMAGE_SIZE,
    )
    site = fed.sites[0]
    index = site_dir.open_index()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # data-quality notes; the report counts them
            report = import_folder(index, site.dicom_dir)
        labels = attach_labels(index, site.labels_csv)
    finally:
        index.close()
    if report.indexed != site.n_images or report.rejected:
        raise RuntimeError(
            f"{report.indexed} of {site.n_images} synthetic images imported, "
            f"{report.rejected} not usable"
        )
    if not labels.ok or labels.labelled_studies == 0:
        raise RuntimeError(f"the labels file did not attach: {labels.summary()}")
    ctx.imported = report.indexed
    ctx.first_dicom = min(site.dicom_dir.rglob("*.dcm"))
    return f"{report.indexed} synthetic images imported, {labels.labelled_studies} studies labelled"


def check_dicom_decoders(ctx: SelfTestContext) -> str:
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from shared.dicom_pixels import decode_frames

    def frames(ds: pydicom.Dataset) -> np.ndarray:
        # the explicit plugin proves pylibjpeg's own decoder is there (pydicom has a fallback
        # for some syntaxes); decode_frames is the path every imported image takes
        pixel_array(ds, decoding_plugin="pylibjpeg")
        return decode_frames(ds)

    done = []
    first = ctx.need("dicom import", ctx.first_dicom)
    reference = decode_frames(pydicom.dcmread(first))
    for syntax, label in ((RLELossless, "RLE"), (JPEG2000Lossless, "JPEG 2000")):
        ds = pydicom.dcmread(first)
        ds.compress(syntax, encoding_plugin="pylibjpeg")
        if not np.array_equal(frames(ds), reference):
            raise RuntimeError(f"a lossless {label} round trip changed the pixels")
        done.append(label)
    paths = {}
    for name in PYDICOM_TEST_FILES:
        path = get_testdata_file(name, download=False)
        if path is None:
            raise RuntimeError(f"pydicom's test file {name} is not installed")
        paths[name] = path
    jpeg = frames(pydicom.dcmread(paths["JPGExtended.dcm"]))
    if jpeg.shape != (1, 1024, 256) or not np.isfinite(jpeg).all() or jpeg.max() <= jpeg.min():
        raise RuntimeError(f"the JPEG test image decoded to {jpeg.shape}, not 1024 x 256 pixels")
    done.append("JPEG")
    lossless = frames(pydicom.dcmread(paths["MR_small_jpeg_ls_lossless.dcm"]))
    if not np.array_equal(lossless, decode_frames(pydicom.dcmread(paths["MR_small.dcm"]))):
        raise RuntimeError("the JPEG-LS test image does not match its uncompressed original")
    done.append("JPEG-LS")
    return ", ".join(done) + " decoded"


def _tiny_plan() -> Any:
    from shared.plan import demo_plan

    return demo_plan(
        rounds=1, input_size=IMAGE_SIZE, local_epochs=1, batch_size=4, quorum=1, min_sites=1
    )


def check_training(ctx: SelfTestContext) -> str:
    import numpy as np
    import torch

    from shared.models.registry import build_model
    from shared.training import train_local

    plan = _tiny_plan()
    model = build_model("small_cnn", "1", input_size=IMAGE_SIZE, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 1, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    labels = np.array([0.0, 1.0] * 4, dtype=np.float32)
    result = train_local(model, images, labels, plan, seed=1)
    if not math.isfinite(result.mean_loss):
        raise RuntimeError(f"the training loss is {result.mean_loss}")
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)):
        raise RuntimeError("the optimiser did not change the weights")
    return f"small_cnn, {result.steps} steps, loss {result.mean_loss:.3f}"


def check_training_process(ctx: SelfTestContext) -> str:
    import numpy as np

    from shared.models.registry import build_model
    from shared.models.state import model_arrays
    from shared.tensors import decode_tensors, encode_tensors
    from site_client.core.trainer import Trainer

    site_dir = ctx.need("site database", ctx.site_dir)
    ctx.need("dicom import", ctx.imported)
    plan = _tiny_plan()
    model = build_model("small_cnn", "1", input_size=IMAGE_SIZE, seed=plan.seed)
    arrays = model_arrays(model)
    data = encode_tensors(arrays)
    model_path = ctx.work / "global.safetensors"
    model_path.write_bytes(data)
    job = {
        "plan": plan.to_dict(),
        "model_path": str(model_path),
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "index_db": str(site_dir.index_db),
        "pseudonym_key": str(site_dir.pseudonym_key),
        "cache_dir": str(site_dir.tensors),
        "data_seed": 0,
        "seed": 1,
    }
    trainer = Trainer(ctx.work / "jobs")

    async def train() -> Any:
        try:
            return await asyncio.wait_for(trainer.train("self-test", job), TIMEOUT_S)
        finally:
            await trainer.close()

    outcome = asyncio.run(train())
    update = decode_tensors(outcome.update_path.read_bytes())
    if set(update) != set(arrays):
        raise RuntimeError("the update does not have the model's tensors")
    if not all(np.isfinite(a).all() for a in update.values()):
        raise RuntimeError("the update holds NaN or Inf")
    if not any(np.any(a) for a in update.values()):
        raise RuntimeError("the update is all zeros: nothing was trained")
    return (
        f"child process trained on {outcome.num_samples} imported images, "
        f"loss {outcome.train_loss:.3f}, update {outcome.size} bytes"
    )


def check_model_registry(ctx: SelfTestContext) -> str:
    from shared.models.registry import build_model

    model = build_model("densenet121", "1", input_size=64, seed=0)
    params = sum(p.numel() for p in model.parameters())
    return f"densenet121 (MONAI), {params / 1e6:.1f} M parameters"


def check_secure_connection(ctx: SelfTestContext) -> str:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    from shared.crypto import tls as tls_mod

    cert, key = ctx.work / "tls" / "cert.pem", ctx.work / "tls" / "key.pem"
    cert.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = tls_mod.generate_self_signed(cert, key, hosts=["127.0.0.1"])

    async def echo(conn: ServerConnection) -> None:
        async for message in conn:
            await conn.send(message)

    # The asyncio stack on both ends, as the coordinator serves and the site connects. The
    # threaded (sync) websockets server hung here twice in CI, its TLS handshake never answered;
    # nothing in Tessera uses that stack, so it has no place in the check. No proxy: a
    # hospital's HTTPS_PROXY must not carry a loopback connection.
    async def round_trip() -> tuple[bytes | str, str]:
        server_tls = tls_mod.server_ssl_context(cert, key)
        client_tls = tls_mod.pinned_client_ssl_context()
        async with serve(echo, "127.0.0.1", 0, ssl=server_tls, open_timeout=TIMEOUT_S) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            url = f"wss://127.0.0.1:{port}"
            async with connect(url, ssl=client_tls, proxy=None, open_timeout=TIMEOUT_S) as conn:
                tls_mod.check_pin(tls_mod.ssl_object_of(conn), fingerprint)
                await conn.send(b"tessera self-test")
                answer = await asyncio.wait_for(conn.recv(), TIMEOUT_S)
                version = tls_mod.ssl_object_of(conn).version()
        return answer, version

    answer, version = asyncio.run(round_trip())
    if answer != b"tessera self-test":
        raise RuntimeError("the loopback peer answered something else")
    return f"{version} websocket on loopback, certificate pinned"


def check_dicom_network(ctx: SelfTestContext) -> str:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines are noise
    server_ae = AE(ae_title="TESSERA")
    server_ae.add_supported_context(Verification)
    server = server_ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        client = AE(ae_title="SELFTEST")
        client.acse_timeout = client.dimse_timeout = client.network_timeout = TIMEOUT_S
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", port, ae_title="TESSERA")
        if not assoc.is_established:
            raise RuntimeError("the loopback association was not accepted")
        status = assoc.send_c_echo()
        assoc.release()
    finally:
        server.shutdown()
    if not status or status.Status != 0x0000:
        raise RuntimeError(f"C-ECHO answered {status!r}")
    return "C-ECHO on loopback answered Success"


CHECKS: tuple[Check, ...] = (
    ("modules", check_modules),
    ("site database", check_site_database),
    ("dicom import", check_dicom_import),
    ("dicom decoders", check_dicom_decoders),
    ("training", check_training),
    ("training process", check_training_process),
    ("model registry", check_model_registry),
    ("secure connection", check_secure_connection),
    ("dicom network", check_dicom_network),
)


# --- the runner ------------------------------------------------------------------------------


def _header() -> str:
    try:
        version = importlib.metadata.version("tessera")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    kind = "bundle" if getattr(sys, "frozen", False) else "source"
    return (
        f"Tessera site self-test: tessera {version} ({kind}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}"
    )


def _line(result: CheckResult) -> str:
    return f"  {result.status:<7} {result.name:<18} {result.detail} ({result.seconds:.1f} s)"


def run_self_test(
    out: TextIO | None = None,
    *,
    checks: Sequence[Check] = CHECKS,
    extra: Iterable[Check] = (),
    work_dir: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SelfTestReport:
    """Run ``checks`` then ``extra`` in a fresh temporary folder (inside ``work_dir`` when
    given), printing one line per check to ``out`` as it finishes; returns the report."""
    out = sys.stdout if out is None else out
    print(_header(), file=out, flush=True)
    results: list[CheckResult] = []
    with tempfile.TemporaryDirectory(prefix="tessera-self-test-", dir=work_dir) as tmp:
        ctx = SelfTestContext(work=Path(tmp))
        for name, check in (*checks, *extra):
            started = clock()
            try:
                detail, status = check(ctx), "ok"
            except Skipped as exc:
                detail, status = f"skipped: {exc}", "skipped"
            except Exception as exc:  # the report is this command's whole job
                detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
            result = CheckResult(name, status, detail, clock() - started)  # type: ignore[arg-type]
            results.append(result)
            print(_line(result), file=out, flush=True)
    report = SelfTestReport(tuple(results))
    print(report.summary(), file=out, flush=True)
    return report
