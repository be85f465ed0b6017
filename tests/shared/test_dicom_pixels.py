"""Pixel decoding for training: every transfer syntax, frames, MONOCHROME1, rescale, windows.

Only the DICOM files that pydicom's wheel ships, found on disk: ``get_testdata_files()``
would also try to download pydicom-data, which must never happen in a test.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import shared.dicom_pixels as dicom_pixels
from shared.dicom_pixels import PIXEL_CODES, _decode_stored, apply_window, decode_frames
from shared.errors import DataError
from shared.imaging import pixels_to_input

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
ALL_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix != ".py")


def _read(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped in the pydicom wheel"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own notes on odd files
        return pydicom.dcmread(path, force=True)


def _decode(name: str, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_frames(_read(name), **kwargs)


def _image(
    frames: np.ndarray,
    *,
    photometric="MONOCHROME2",
    bits=12,
    signed=False,
    slope=None,
    intercept=None,
) -> Dataset:
    """A synthetic greyscale image from ``frames`` shaped (frames, rows, cols)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = frames.astype("<i2" if signed else "<u2").tobytes()
    return ds


def _ramp(rows=8, cols=16, top=4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, cols), (rows, 1)).round()[None]


# --- every file pydicom ships -------------------------------------------------------------


def test_the_wheel_ships_files_and_none_is_downloaded():
    assert len(ALL_FILES) > 150
    assert get_testdata_file("emri_small.dcm", download=False) is None  # download-only


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(TEST_FILES)))
def test_every_shipped_file_decodes_or_is_rejected_with_a_code(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # not DICOM at all: the importer's job, before decoding
            pytest.skip("not readable as DICOM")
        try:
            frames = decode_frames(ds)
        except DataError as exc:
            assert exc.code in PIXEL_CODES, exc.code
            assert exc.message and "Traceback" not in exc.message
            return
        assert frames.dtype == np.float32
        assert frames.shape == (dicom_pixels.number_of_frames(ds), ds.Rows, ds.Columns)
        assert np.isfinite(frames).all()
        windowed = apply_window(frames, ds)
        assert windowed.dtype == np.float32 and windowed.shape == frames.shape
        assert windowed.min() >= 0.0 and windowed.max() <= 1.0
        model_input = pixels_to_input(ds, 8, frame=frames.shape[0] - 1)
        assert model_input.shape == (1, 8, 8) and np.isfinite(model_input).all()


def test_shipped_files_by_outcome():
    """The sweep above, counted: a change in any bucket is a change in what sites accept."""
    outcome: dict[str, list[str]] = {}
    for path in ALL_FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, force=True)
                decode_frames(ds)
                key = "decoded"
            except DataError as exc:
                key = exc.code
            except Exception:
                key = "not DICOM"
        outcome.setdefault(key, []).append(path.name)
    assert set(outcome) <= {"decoded", "not DICOM", *PIXEL_CODES}
    assert len(outcome["decoded"]) == 56
    assert sorted(outcome["data.corrupt_pixels"]) == [
        "JPEG-lossy.dcm",  # pydicom's README: invalid SOS parameters for sequential JPEG
        "JPEG2000-embedded-sequence-delimiter.dcm",  # bytes of the codestream overwritten
        "MR_truncated.dcm",
        "badVR.dcm",  # Number of Frames '1A'
        "meta_missing_tsyntax.dcm",
        "nested_priv_SQ.dcm",
    ]
    assert len(outcome["data.unsupported_photometric"]) == 33
    assert {"test-SR.dcm", "rtplan.dcm", "rtstruct.dcm", "waveform_ecg.dcm"} <= set(
        outcome["data.no_pixels"]
    )


# --- transfer syntaxes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_padded.dcm",
    ],
)
def test_lossless_twins_decode_to_the_uncompressed_reference(twin):
    reference = _decode("MR_small.dcm")
    assert reference.shape == (1, 64, 64)
    np.testing.assert_array_equal(_decode(twin), reference)


def test_jpeg_2000_lossy_baseline_extended_ls_near_lossless_and_deflate_decode():
    assert _decode("JPEG2000.dcm").shape == (1, 1024, 256)  # JPEG 2000 (lossy allowed)
    assert _decode("693_J2KI.dcm").shape == (1, 512, 512)
    extended = _decode("JPGExtended.dcm")  # JPEG Extended, 12-bit
    assert extended.shape == (1, 1024, 256) and extended.max() > 255
    assert _decode("JPEGLSNearLossless_16.dcm").max() > 255  # JPEG-LS near-lossless
    assert _decode("JPEGLSNearLossless_08.dcm").shape == (1, 45, 10)
    deflated = _decode("image_dfl.dcm")  # Deflated Explicit VR Little Endian
    assert deflated.shape == (1, 512, 512) and deflated.std() > 0


def test_jpeg_lossless_and_baseline_decoders_run_on_the_colour_files():
    """The only JPEG lossless and baseline files shipped are colour, which training refuses;
    their decoding is still checked below the photometric check, against the RLE twin."""
    rle = _decode_stored(_read("SC_rgb_rle.dcm"), None)
    lossless = _decode_stored(_read("SC_rgb_jpeg_gdcm.dcm"), None)  # JPEG Lossless SV1
    np.testing.assert_array_equal(lossless, rle)
    baseline = _decode_stored(_read("SC_rgb_jpeg_dcmtk.dcm"), None)  # JPEG Baseline 8-bit
    assert baseline.shape == rle.shape
    assert np.abs(baseline.astype(np.int16) - rle).mean() < 2.0
    with pytest.raises(DataError, match="Only greyscale images") as info:
        decode_frames(_read("SC_rgb_jpeg_gdcm.dcm"))
    assert info.value.code == "data.unsupported_photometric"


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(32, 40),  # openjpeg's encoder wants 2**5 pixels per side (6 resolutions)
    st.integers(32, 40),
    st.booleans(),
    st.sampled_from([RLELossless, JPEG2000Lossless]),
    st.integers(0, 2**32 - 1),
)
def test_lossless_round_trip_of_synthetic_frames(n, rows, cols, signed, uid, seed):
    lo, hi = (-2048, 2047) if signed else (0, 4095)
    values = np.random.default_rng(seed).integers(lo, hi, (n, rows, cols), endpoint=True)
    ds = _image(values, signed=signed)
    expected = decode_frames(ds)
    np.testing.assert_array_equal(expected, values.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.compress(uid)
    assert ds.file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(decode_frames(ds), expected)


def test_unknown_transfer_syntax_is_named():
    ds = _image(_ramp())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" * 4])
    ds["PixelData"].VR = "OB"
    with pytest.raises(DataError, match=r"MPEG2.*cannot be decoded") as info:
        decode_frames(ds)
    assert info.value.code == "data.transfer_syntax"
    assert info.value.fields["transfer_syntax"] == MPEG2MPML
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"  # private, unknown
    with pytest.raises(DataError, match=r"unknown \(1\.2\.3\.4\.5\.6\)"):
        decode_frames(ds)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DataError, match="no Transfer Syntax UID") as info:
        decode_frames(ds)
    assert info.value.code == "data.transfer_syntax"


def test_a_missing_plugin_is_named(monkeypatch):
    class Unavailable:
        is_available = False
        # pydicom's format: one readable string per plugin
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg"]

    monkeypatch.setattr(dicom_pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(DataError, match=r"plugin that is not installed.*pylibjpeg-openjpeg"):
        decode_frames(_read("JPEG2000.dcm"))


def test_truncated_and_corrupt_pixel_data():
    with pytest.raises(DataError, match="truncated, corrupt") as info:
        decode_frames(_read("MR_truncated.dcm"))
    assert info.value.code == "data.corrupt_pixels"
    ds = _image(_ramp())
    ds.PixelData = ds.PixelData[:-10]
    with pytest.raises(DataError, match=r"Explicit VR Little Endian.*truncated"):
        decode_frames(ds)
    ds = _read("MR_small_RLE.dcm")
    ds.PixelData = ds.PixelData[:200]
    with pytest.raises(DataError, match=r"RLE Lossless.*cannot be decoded") as info:
        decode_frames(ds)
    assert info.value.code == "data.corrupt_pixels"
    ds = _image(_ramp())
    del ds.Rows
    with pytest.raises(DataError, match=r"incomplete \(missing Rows\)"):
        decode_frames(ds)


def test_objects_without_pixels():
    with pytest.raises(DataError, match=r"no image.*modality SR") as info:
        decode_frames(_read("test-SR.dcm"))
    assert info.value.code == "data.no_pixels"


# --- frames ---------------------------------------------------------------------------


def test_multi_frame_and_frame_selection():
    frames = _decode("rtdose.dcm")
    assert frames.shape == (15, 10, 10)
    assert len({f.tobytes() for f in frames}) > 1
    np.testing.assert_array_equal(_decode("rtdose_rle.dcm"), frames)  # RLE multi-frame
    np.testing.assert_array_equal(_decode("rtdose_expb.dcm"), frames)
    np.testing.assert_array_equal(_decode("rtdose.dcm", index=7), frames[7:8])
    ds = _read("rtdose.dcm")
    assert not np.array_equal(pixels_to_input(ds, 4, frame=0), pixels_to_input(ds, 4, frame=7))
    with pytest.raises(DataError, match="Frame 15 was asked for, but this image has 15") as info:
        pixels_to_input(ds, 4, frame=15)
    assert info.value.code == "data.frame"


# --- modality LUT, MONOCHROME1 ----------------------------------------------------------------


def test_rescale_and_monochrome1_inversion():
    ramp = _ramp()
    rescaled = decode_frames(_image(ramp, slope=2.0, intercept=-1024.0))
    np.testing.assert_array_equal(rescaled, ramp * 2.0 - 1024.0)
    inverted = decode_frames(_image(4095 - ramp, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, ramp)  # lo + hi - x over 0..4095: bright = dense
    both = decode_frames(_image(4095 - ramp, photometric="MONOCHROME1", slope=2, intercept=-1024))
    np.testing.assert_array_equal(both, ramp * 2.0 - 1024.0)
    cr = decode_frames(_read("6154"))  # a real MONOCHROME1 CR with rescale
    ds = _read("6154")
    stored = ds.pixel_array.astype(np.float64) * 0.684 + 200
    lo, hi = 200.0, 4095 * 0.684 + 200
    np.testing.assert_allclose(cr[0], lo + hi - stored, rtol=1e-6)


def test_modality_lut_sequence():
    ds = _image(np.array([[[0, 1, 2, 3]]]), bits=8)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [100, 200, 300, 400]
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    ds.ModalityLUTSequence = Sequence([item])
    np.testing.assert_array_equal(decode_frames(ds), [[[100, 200, 300, 400]]])


def test_enhanced_multi_frame_rescale_per_frame():
    ds = _image(np.stack([_ramp()[0], _ramp()[0]]))
    groups = []
    for slope in (1.0, 3.0):
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, -10.0, "US"
        group = Dataset()
        group.PixelValueTransformationSequence = Sequence([pvt])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    frames = decode_frames(ds)
    np.testing.assert_array_equal(frames[0], _ramp()[0] - 10)
    np.testing.assert_array_equal(frames[1], _ramp()[0] * 3 - 10)
    np.testing.assert_array_equal(decode_frames(ds, index=1), frames[1:])


def test_bad_rescale_is_a_data_error():
    ds = _image(_ramp(), slope=0.0, intercept=0.0)
    with pytest.raises(DataError, match="Rescale Slope/Intercept is invalid") as info:
        decode_frames(ds)
    assert info.value.code == "data.corrupt_pixels"


# --- windows ----------------------------------------------------------------------------------


def test_file_window_explicit_window_and_fallback():
    ds = _read("MR_small.dcm")  # Window Center 600, Width 1600
    frames = decode_frames(ds)
    windowed = apply_window(frames, ds)
    center, width = 600 - 0.5, 1600 - 1  # PS3.3 C.11.2.1.2.1 (LINEAR)
    expected = np.clip((frames - center) / width + 0.5, 0, 1)
    np.testing.assert_allclose(windowed, expected, atol=1e-6)
    np.testing.assert_allclose(apply_window(frames, ds, window=(600, 1600)), expected, atol=1e-6)
    narrow = apply_window(frames, ds, window=(1000, 2))
    assert set(np.unique(narrow)) <= {0.0, 1.0}
    plain = _image(_ramp())  # no window in the file: its own min..max
    np.testing.assert_allclose(
        apply_window(decode_frames(plain), plain)[0, 0], _ramp()[0, 0] / 4095
    )
    with pytest.raises(DataError, match="width must be at least 1") as info:
        apply_window(frames, ds, window=(0, 0))
    assert info.value.code == "data.window"


def test_monochrome1_window_shows_dense_as_bright():
    ramp = _ramp()
    m2 = _image(ramp)
    m1 = _image(4095 - ramp, photometric="MONOCHROME1")
    m2.WindowCenter, m2.WindowWidth = 1000, 1000
    m1.WindowCenter, m1.WindowWidth = 4095 - 1000 + 1, 1000  # the same window on stored values
    w2 = apply_window(decode_frames(m2), m2)
    w1 = apply_window(decode_frames(m1), m1)
    np.testing.assert_allclose(w1, w2, atol=2e-3)
    assert w1[0, 0, -1] == 1.0 and w1[0, 0, 0] == 0.0


def test_voi_lut_sequence():
    ds = _image(np.array([[[0, 1, 2, 3]]]), bits=8)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 51, 102, 255]
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    np.testing.assert_allclose(apply_window(decode_frames(ds), ds), [[[0, 0.2, 0.4, 1.0]]])


def test_pixels_to_input_with_a_window_is_in_unit_range_and_not_z_scored():
    ct = _read("CT_small.dcm")
    lung = pixels_to_input(ct, 16, window=(-600, 1500))
    assert lung.shape == (1, 16, 16) and lung.min() >= 0 and lung.max() <= 1
    assert abs(float(lung.mean())) > 0.05
    mr = _read("MR_small.dcm")
    np.testing.assert_allclose(
        pixels_to_input(mr, 64, window="file")[0], apply_window(decode_frames(mr), mr)[0]
    )
    default = pixels_to_input(mr, 16)
    assert abs(float(default.mean())) < 1e-5  # the unchanged z-score path


def test_float_pixel_data_and_non_finite_values():
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2, 2, 1
    ds.PhotometricInterpretation, ds.BitsAllocated = "MONOCHROME1", 32
    ds.FloatPixelData = np.array([1.5, -2.0, 3.0, 4.0], "<f4").tobytes()
    np.testing.assert_array_equal(decode_frames(ds), [[[0.5, 4.0], [-1.0, -2.0]]])
    ds.FloatPixelData = np.array([np.nan, 1, 2, 3], "<f4").tobytes()
    with pytest.raises(DataError, match="not finite numbers") as info:
        decode_frames(ds)
    assert info.value.code == "data.corrupt_pixels"


_COMPRESSED = {
    name: _read(name).PixelData
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPGExtended.dcm",
    )
}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(_COMPRESSED)),
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    st.booleans(),
)
def test_damaged_compressed_pixel_data_raises_only_data_error(name, seed, n_changes, truncate):
    """Bytes flipped or cut anywhere after the basic offset table: a finite array or a
    DataError, never another exception (the bar the importer relies on)."""
    rng = np.random.default_rng(seed)
    data = bytearray(_COMPRESSED[name])
    start = 16  # keep the item tag and an empty offset table intact sometimes
    if truncate:
        data = data[: int(rng.integers(start, len(data)))]
    for pos in rng.integers(start, len(data), n_changes):
        data[pos] = int(rng.integers(0, 256))
    ds = _read(name)
    ds.PixelData = bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            frames = decode_frames(ds)
        except DataError as exc:
            assert exc.code in PIXEL_CODES
            return
    assert frames.dtype == np.float32 and np.isfinite(frames).all()
