"""Predictions with a model release on this site's own images (Qt-free; nothing leaves the site).

Theory of operation
-------------------
1. **Verify, then build.** :func:`load_release` checks the release folder with the
   coordinator's public key from the site's enrolment (:func:`shared.releases.verify_release`:
   signatures, hashes, inclusion in the provenance log) and only then builds the plan's
   architecture from the registry in this installation and loads the verified weights
   (safetensors, decoded by :mod:`shared.tensors`; never pickle or ``torch.load``).
2. **Prepare exactly as training does.** Each file is read with pydicom and goes through
   :func:`shared.imaging.pixels_to_input` with the plan's input size and window, taking the
   middle frame of a multi-frame object, as the site's training set does
   (:mod:`site_client.core.intake.dataset`). A file that cannot be read or decoded becomes a
   refused :class:`Prediction` with a stable ``data.*`` code and a plain reason, never an
   exception.
3. **Overlap reading with the model.** A small thread pool reads and prepares the next files
   while the model runs on the current batch (pydicom's parsing and torch's kernels release the
   interpreter for much of their work), at most ``2 * batch_size`` files ahead so memory stays
   bounded whatever the folder's size.
4. **Predict.** The probability is the sigmoid of the model's one logit
   (:func:`shared.training.predict_scores`, the same path as validation); the predicted label
   is 1 at 0.5 or above. With a saliency folder, each batch instead runs forward and backward
   once for Grad-CAM (Selvaraju et al., ICCV 2017): the last spatial feature map before the
   model's global pooling, weighted by the mean gradient of the logit per channel, ReLU, scaled
   to [0, 1] and laid over the image as a PNG. Grad-CAM is per-image exact in a batch because
   in eval mode no image's output depends on another's. It is written out here (a tensor hook,
   a mean, a ReLU) rather than taken from MONAI's ``GradCAM``, which needs the target layer's
   name for each architecture: this one finds that layer from a forward pass, so every
   registry architecture gets saliency without a table to keep up to date.

``progress(done, total)`` is called as files finish; ``should_stop()`` is polled before each
file and stops the work, keeping what was predicted (``cancelled`` in the report). The CSV is
written atomically at the end.
"""

from __future__ import annotations

import csv
import io
import math
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from torch import nn

from shared.dicom_pixels import Window, number_of_frames
from shared.errors import DataError, ReleaseError, UpdateError
from shared.imaging import pixels_to_input
from shared.models.registry import build_model
from shared.models.state import load_model_arrays
from shared.plan import TrainingPlan
from shared.releases import VerifiedRelease, verify_release
from shared.tensors import decode_tensors
from shared.training import predict_scores
from site_client.core.intake.dataset import _window as plan_window
from site_client.core.intake.index import SiteIndex

__all__ = [
    "CSV_COLUMNS",
    "THRESHOLD",
    "LoadedRelease",
    "Prediction",
    "PredictionReport",
    "default_threads",
    "folder_files",
    "grad_cam",
    "load_release",
    "overlay_png",
    "predict_files",
    "prepare_file",
    "prepared_stream",
    "study_files",
]

THRESHOLD = 0.5
CSV_COLUMNS = (
    "file",
    "study_uid",
    "series_uid",
    "sop_uid",
    "frame",
    "probability",
    "predicted_label",
    "release_version",
    "status",
    "reason",
    "saliency",
)
SALIENCY_SIDE = 256  # pixels of a saliency PNG's side (at least the input size)

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


# --- the release --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class LoadedRelease:
    """A verified release and its model, in eval mode, ready to predict."""

    release: VerifiedRelease
    model: nn.Module
    own_layers: bool = False  # FedBN: this site's normalisation layers are in place

    @property
    def needs_own_layers(self) -> bool:
        """A FedBN release used without this site's layers (it did not keep them): its
        normalisation layers are the initial ones, and predictions may be poor."""
        return self.plan.aggregation == "fedbn" and not self.own_layers

    @property
    def plan(self) -> TrainingPlan:
        return self.release.plan

    @property
    def version(self) -> str:
        return self.release.version


def load_release(
    folder: Path, coordinator_key: str, site_root: Path | None = None
) -> LoadedRelease:
    """Verify the release in ``folder`` and build its model; raises ``ReleaseError`` (or
    ``PlanError`` for an architecture this installation does not have) and nothing is used.

    With ``site_root`` (the site's data folder), a FedBN release gets the normalisation layers
    this site trained in that run put in place: under FedBN they never left the site, and the
    release carries only their initial values (``shared.aggregation.fedbn``)."""
    verified = verify_release(Path(folder), coordinator_key)
    plan = verified.plan
    model = build_model(
        plan.architecture,
        plan.architecture_version,
        input_size=plan.input_size,
        params=dict(plan.architecture_params),
        seed=plan.seed,
    )
    weights = decode_tensors(verified.weights)
    own = None
    if site_root is not None and plan.aggregation == "fedbn":
        from site_client.core import local_state

        folder_of_run = local_state.run_folder(Path(site_root), verified.run_id)
        own = local_state.load(folder_of_run, local_state.NORM_LAYERS, up_to=plan.rounds)
    try:
        if own is not None:
            from shared.aggregation import merge_local

            weights = merge_local(weights, own)
        load_model_arrays(model, weights)
    except UpdateError as exc:
        raise ReleaseError(
            f"The release's weights do not fit {plan.architecture} version "
            f"{plan.architecture_version} as this installation builds it ({exc}). Update "
            "Tessera at this site, or ask the consortium lead which version to use.",
            code="release.weights_mismatch",
        ) from exc
    model.eval().requires_grad_(False)
    return LoadedRelease(verified, model, own_layers=own is not None)


def default_threads() -> int:
    """Threads for the model: every usable core but one, which reads and decodes the next
    files meanwhile (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


# --- which files --------------------------------------------------------------------------


def folder_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` (recursively), sorted; ``DataError`` if it is not
    a folder (an unmounted share must not look like an empty one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder; give the folder that holds the DICOM files.",
            code="data.empty",
        )
    return sorted(p for p in folder.rglob("*") if p.is_file())


def study_files(index: SiteIndex, study_uids: Sequence[str]) -> list[Path]:
    """The files of the given studies in the site's index, in the order asked; raises
    ``DataError`` naming studies the index does not hold (import them first)."""
    files: list[Path] = []
    unknown = []
    for uid in study_uids:
        found = sorted(r.path for r in index.instances("study_uid = ?", [uid]))
        if not found:
            unknown.append(uid)
        files.extend(Path(p) for p in found)
    if unknown:
        raise DataError(
            f"{len(unknown)} study UID(s) are not among this site's imported images (the first: "
            f"{unknown[0]}). Import the studies with 'tessera-site import' first, or check the "
            "UIDs.",
            code="data.unknown_study",
        )
    return files


# --- reading and preparing one file -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """One file's result: predicted (``probability`` set) or refused (``code`` and ``reason``
    set). UIDs are those of the file, "" when it has none; ``saliency`` is the PNG's name."""

    file: str
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    frame: int | None = None
    probability: float | None = None
    predicted_label: int | None = None
    code: str = ""
    reason: str = ""
    saliency: str = ""

    @property
    def predicted(self) -> bool:
        return self.probability is not None


@dataclass(frozen=True, slots=True, eq=False)
class _Prepared:
    """A file ready for the model: its identity and its input ``(1, S, S)`` float32."""

    info: Prediction
    image: np.ndarray


_NOT_DICOM = "Not a DICOM file (no DICOM header could be read)."


def _read(path: Path) -> pydicom.Dataset:
    """The dataset in ``path``, or ``DataError``: like the import, a file without the "DICM"
    preamble (PS3.10 7.1) is read anyway and refused if it holds no DICOM identifiers."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except OSError as exc:
        raise DataError(
            f"The file cannot be opened ({type(exc).__name__}); check its permissions.",
            code="data.unreadable",
        ) from exc
    except Exception as exc:  # adapter edge: a header pydicom cannot parse
        raise DataError(
            f"The DICOM header is damaged ({type(exc).__name__}).", code="data.not_dicom"
        ) from exc
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise DataError(_NOT_DICOM, code="data.not_dicom") from exc
    if not any(ds.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
        raise DataError(_NOT_DICOM, code="data.not_dicom")
    return ds


def _uid(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:  # a malformed element: leave the column empty
        return ""


def prepare_file(
    path: Path, input_size: int, window: Window, label: str | None = None
) -> _Prepared | Prediction:
    """One file to its model input, exactly as the site's training prepares it, or a refused
    :class:`Prediction` with the reason. Never raises for a bad file. ``label`` names the file
    in the result (default: the path as given)."""
    name = str(path) if label is None else label
    info = Prediction(file=name)
    try:
        ds = _read(Path(path))
        info = Prediction(
            file=name,
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            sop_uid=_uid(ds, "SOPInstanceUID"),
        )
        frame = number_of_frames(ds) // 2
        image = pixels_to_input(ds, input_size, frame=frame, window=window)
    except DataError as exc:
        return _refused(info, exc.code, exc.message)
    except MemoryError:
        return _refused(info, "data.too_large", "The image is too large to decode here.")
    except Exception as exc:  # adapter edge: pixels the imaging code did not classify
        reason = f"The pixel data cannot be decoded ({type(exc).__name__})."
        return _refused(info, "data.corrupt_pixels", reason)
    if image.shape != (1, input_size, input_size) or not np.isfinite(image).all():
        return _refused(info, "data.shape", "The image could not be prepared for the model.")
    return _Prepared(_frame(info, frame), image)


def _refused(info: Prediction, code: str, reason: str) -> Prediction:
    return Prediction(
        file=info.file,
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        sop_uid=info.sop_uid,
        code=code,
        reason=reason,
    )


def _frame(info: Prediction, frame: int) -> Prediction:
    return Prediction(
        file=info.file,
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        sop_uid=info.sop_uid,
        frame=frame,
    )


def prepared_stream(
    jobs: Iterable[tuple[Path, str]],
    input_size: int,
    window: Window,
    *,
    ahead: int = 32,
    workers: int = 2,
    should_stop: ShouldStop | None = None,
) -> Iterator[_Prepared | Prediction]:
    """:func:`prepare_file` over ``jobs`` (path, label), in order, with up to ``ahead`` files
    being prepared by ``workers`` threads while the caller works on what it was given.

    Stops early (without error) once ``should_stop()`` is true; files not yet handed out are
    dropped, and closing the generator cancels them too.
    """
    stop = should_stop or (lambda: False)
    it = iter(jobs)
    pending: deque[Future[_Prepared | Prediction]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="predict") as pool:

        def fill() -> None:
            while len(pending) < max(1, ahead):
                job = next(it, None)
                if job is None:
                    return
                pending.append(pool.submit(prepare_file, job[0], input_size, window, job[1]))

        try:
            fill()
            while pending and not stop():
                item = pending.popleft().result()
                fill()
                yield item
        finally:
            for future in pending:
                future.cancel()


# --- the model ----------------------------------------------------------------------------


def _target_layer(model: nn.Module, input_size: int) -> nn.Module:
    """The module whose output is the last feature map with more than one pixel in a forward
    pass: where Grad-CAM looks (the last convolutional features before global pooling)."""
    found: list[nn.Module] = []
    hooks = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-2:].numel() > 1:
            found.append(module)

    for module in model.modules():
        if not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(record))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 1, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ReleaseError(
            "This model has no spatial feature map, so no saliency map can be drawn; predict "
            "without --saliency.",
            code="release.no_saliency",
        )
    return found[-1]


def grad_cam(
    model: nn.Module, layer: nn.Module, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(N,)`` and Grad-CAM maps ``(N, S, S)`` in [0, 1] of a batch of inputs
    ``(N, 1, S, S)`` for the one logit of a binary model in eval mode (Selvaraju et al.)."""
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        saved["features"] = output
        output.register_hook(lambda grad: saved.__setitem__("grad", grad))

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).requires_grad_(True)
    hook = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)[:, 0]
            logits.sum().backward()  # images are independent in eval mode
    finally:
        hook.remove()
    features, grad = saved["features"].detach(), saved["grad"]
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    cam = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam))
    return torch.sigmoid(logits.detach()).double().numpy(), cam.numpy()


# --- saliency pictures --------------------------------------------------------------------


def _png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (ISO/IEC 15948): signature, IHDR, one zlib IDAT of unfiltered rows,
    IEND; each chunk with its CRC-32."""
    height, width, _ = rgb.shape
    rows = np.concatenate(
        [np.zeros((height, 1), np.uint8), np.ascontiguousarray(rgb, np.uint8).reshape(height, -1)],
        axis=1,
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def overlay_png(image: np.ndarray, cam: np.ndarray, side: int = SALIENCY_SIDE) -> bytes:
    """The model's input ``(1, S, S)`` in grey with the map ``(S, S)`` laid over it in colour
    (blue-to-red, transparent where the map is 0), as PNG bytes of ``side`` pixels."""
    size = max(int(side), image.shape[-1])
    both = torch.from_numpy(np.stack([image[0], cam]).astype(np.float32))[None]
    grey, heat = F.interpolate(both, size=(size, size), mode="bilinear", align_corners=False)[0]
    lo, hi = np.percentile(grey.numpy(), [1, 99])
    grey = np.clip((grey.numpy() - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros((size, size))
    t = np.clip(heat.numpy(), 0, 1)
    colour = np.stack([np.clip(1.5 - np.abs(4 * t - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    alpha = 0.5 * t[..., None]
    rgb = (1 - alpha) * grey[..., None] + alpha * colour
    return _png(np.rint(rgb * 255).astype(np.uint8))


# --- the whole job ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PredictionReport:
    release_version: str
    run_id: str
    predictions: tuple[Prediction, ...]
    total: int  # files asked for
    cancelled: bool
    csv: Path | None
    saliency_dir: Path | None

    @property
    def predicted(self) -> list[Prediction]:
        return [p for p in self.predictions if p.predicted]

    @property
    def refused(self) -> list[Prediction]:
        return [p for p in self.predictions if not p.predicted]

    def summary(self) -> str:
        positive = sum(1 for p in self.predicted if p.predicted_label == 1)
        line = (
            f"release {self.release_version}: {len(self.predicted)} image(s) predicted "
            f"({positive} with label 1), {len(self.refused)} file(s) not usable"
        )
        if self.cancelled:
            line += f"; cancelled after {len(self.predictions)} of {self.total} files"
        return line


def _csv_bytes(predictions: Sequence[Prediction], version: str) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in predictions:
        writer.writerow(
            [
                p.file,
                p.study_uid,
                p.series_uid,
                p.sop_uid,
                "" if p.frame is None else p.frame,
                "" if p.probability is None else f"{p.probability:.6f}",
                "" if p.predicted_label is None else p.predicted_label,
                version,
                "predicted" if p.predicted else "refused",
                p.code if not p.reason else f"{p.reason} [{p.code}]",
                p.saliency,
            ]
        )
    return buf.getvalue().encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)[:80] or "image"


def predict_files(
    loaded: LoadedRelease,
    files: Sequence[Path],
    *,
    out_csv: Path | None = None,
    saliency_dir: Path | None = None,
    base: Path | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    batch_size: int = 16,
    workers: int = 2,
) -> PredictionReport:
    """Predict every file in ``files`` with ``loaded`` (see the module docstring).

    ``base``: files under it are named relative to it in the results. ``out_csv``: where the
    CSV goes (written even when cancelled, with what was done). ``saliency_dir``: where the
    Grad-CAM PNGs go (none without it). Bad files are refused in the results, not raised.
    """
    plan = loaded.plan
    size = plan.input_size
    window = plan_window(dict(plan.preprocessing))  # a bad window is the plan's: raise once
    layer = _target_layer(loaded.model, size) if saliency_dir is not None else None
    if saliency_dir is not None:
        Path(saliency_dir).mkdir(parents=True, exist_ok=True)
    stop = should_stop or (lambda: False)
    total = len(files)

    def label(path: Path) -> str:
        if base is not None:
            try:
                return str(Path(path).relative_to(base))
            except ValueError:
                pass
        return str(path)

    results: dict[int, Prediction] = {}  # by position in ``files``
    batch: list[tuple[int, _Prepared]] = []

    def run_batch() -> None:
        if not batch:
            return
        images = np.stack([item.image for _, item in batch])
        if layer is None:
            probabilities, cams = predict_scores(loaded.model, images, batch_size=len(batch)), None
        else:
            probabilities, cams = grad_cam(loaded.model, layer, images)
        for i, (position, item) in enumerate(batch):
            probability = float(probabilities[i])
            if not math.isfinite(probability):
                reason = "The model gave no finite output for this image."
                results[position] = _refused(item.info, "data.model_output", reason)
                continue
            picture = ""
            if cams is not None and saliency_dir is not None:
                picture = f"{position + 1:05d}_{_safe_name(item.info.sop_uid or 'image')}.png"
                _write_atomic(Path(saliency_dir) / picture, overlay_png(item.image, cams[i]))
            results[position] = Prediction(
                file=item.info.file,
                study_uid=item.info.study_uid,
                series_uid=item.info.series_uid,
                sop_uid=item.info.sop_uid,
                frame=item.info.frame,
                probability=probability,
                predicted_label=int(probability >= THRESHOLD),
                saliency=picture,
            )
        batch.clear()
        if progress is not None:
            progress(len(results), total)

    stream = prepared_stream(
        ((Path(f), label(Path(f))) for f in files),
        size,
        window,
        ahead=2 * batch_size,
        workers=workers,
        should_stop=stop,
    )
    for position, item in enumerate(stream):
        if isinstance(item, Prediction):
            results[position] = item
            if progress is not None:
                progress(len(results), total)
        else:
            batch.append((position, item))
            if len(batch) >= batch_size:
                run_batch()
    run_batch()
    ordered = [results[i] for i in sorted(results)]
    cancelled = len(ordered) < total
    if out_csv is not None:
        _write_atomic(Path(out_csv), _csv_bytes(ordered, loaded.version))
    return PredictionReport(
        release_version=loaded.version,
        run_id=loaded.release.run_id,
        predictions=tuple(ordered),
        total=total,
        cancelled=cancelled,
        csv=None if out_csv is None else Path(out_csv),
        saliency_dir=None if saliency_dir is None else Path(saliency_dir),
    )
