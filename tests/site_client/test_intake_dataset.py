"""The local dataset from the index: patient-level stratified split and the on-disk tensor cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import DataError, TrainingCancelled
from shared.imaging import load_labelled_folder
from shared.synthetic import generate_federation
from site_client.core.intake.dataset import build_dataset, split_patients
from site_client.core.intake.importer import import_folder
from site_client.core.intake.index import SiteIndex
from site_client.core.intake.labels import attach_labels

SECRET = b"s" * 32


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(
        tmp_path_factory.mktemp("fed"),
        sites=1,
        seed=4,
        images_per_site=40,
        test_images=0,
        image_size=32,
    )


@pytest.fixture
def site(tmp_path: Path, federation):
    """A copy of the synthetic site (tests change files), imported and labelled."""
    src = federation.sites[0]
    dicom = tmp_path / "dicom"
    for path in src.dicom_dir.rglob("*.dcm"):
        dest = dicom / path.relative_to(src.dicom_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    index = SiteIndex(tmp_path / "index.db", SECRET)
    import_folder(index, dicom)
    attach_labels(index, src.labels_csv)
    yield index, dicom, src
    index.close()


def test_build_gives_every_labelled_image_split_by_patient(site, tmp_path):
    index, _, src = site
    ds = build_dataset(index, tmp_path / "cache", input_size=32, seed=1)
    assert ds.n_train + ds.n_holdout == 40
    assert ds.train_images.shape == (ds.n_train, 1, 32, 32)
    assert ds.train_images.dtype == ds.holdout_images.dtype == np.float32
    assert isinstance(ds.train_images, np.memmap) and not ds.train_images.flags.writeable
    assert ds.misses == 40 and ds.hits == 0 and ds.skipped == ()
    # the same inputs as the folder path, image for image
    folder = load_labelled_folder(src.dicom_dir, src.labels_csv, input_size=32)
    ours = np.concatenate([ds.train_images, ds.holdout_images])
    assert sorted(float(x.sum()) for x in ours) == pytest.approx(
        sorted(float(x.sum()) for x in folder.images), abs=1e-3
    )
    assert float(np.concatenate([ds.train_labels, ds.holdout_labels]).sum()) == float(
        folder.labels.sum()
    )


def test_split_is_patient_level_stratified_and_deterministic(site, tmp_path):
    index, _, _ = site
    a = build_dataset(index, tmp_path / "cache", input_size=32, seed=1)
    b = build_dataset(index, tmp_path / "cache", input_size=32, seed=1)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.holdout_labels, b.holdout_labels)
    for ds in (a, b):  # both classes on both sides
        assert set(np.unique(ds.train_labels)) == set(np.unique(ds.holdout_labels)) == {0.0, 1.0}
    patients = {r.patient_key for r in index.instances()}
    assert not set(a.train_patient_keys) & set(a.holdout_patient_keys)
    assert set(a.train_patient_keys) | set(a.holdout_patient_keys) == patients
    assert len(a.train_patient_keys) == a.n_train and a.holdout_patients >= 2
    other = build_dataset(index, tmp_path / "cache", input_size=32, seed=2)
    assert other.hits == 40 and other.misses == 0  # a new split costs no decoding
    assert not np.array_equal(np.asarray(other.holdout_images), np.asarray(a.holdout_images))


def test_split_patients_keeps_both_classes_on_both_sides():
    labels = {f"p{i}": float(i < 3) for i in range(10)}  # 3 positive, 7 negative patients
    held = split_patients(labels, 0.2, seed=0)
    assert sum(labels[p] for p in held) == 1  # round(0.6) = 1 positive
    assert len(held) == 1 + 1  # round(1.4) = 1 negative
    assert split_patients(dict(reversed(list(labels.items()))), 0.2, seed=0) == held
    assert split_patients(labels, 0.0, seed=0) == frozenset()
    assert len(split_patients({"a": 1.0, "b": 0.0}, 0.2, seed=0)) == 1
    with pytest.raises(DataError, match=r"hold-out fraction must be in \[0, 1\)"):
        split_patients(labels, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.dictionaries(
        st.text(min_size=1, max_size=6), st.sampled_from([0.0, 1.0]), max_size=40
    ),
    fraction=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**32),
)
def test_split_patients_properties(labels, fraction, seed):
    held = split_patients(labels, fraction, seed)
    assert held <= set(labels)
    assert held == split_patients(dict(sorted(labels.items())), fraction, seed)
    if len(labels) >= 2:
        assert 0 < len(held) < len(labels)
    for cls in (0.0, 1.0):
        members = {p for p, y in labels.items() if y == cls}
        if len(members) >= 2:
            assert members & held and members - held  # this class on both sides


def test_the_cache_rebuilds_only_a_changed_file(site, tmp_path):
    index, dicom, _ = site
    cache = tmp_path / "cache"
    first = build_dataset(index, cache, input_size=32)
    warm = build_dataset(index, cache, input_size=32)
    assert (warm.hits, warm.misses) == (40, 0)
    changed = sorted(dicom.rglob("*.dcm"))[5]
    st_ = changed.stat()
    os.utime(changed, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10_000_000_000))
    again = build_dataset(index, cache, input_size=32)
    assert (again.hits, again.misses) == (39, 1)
    np.testing.assert_array_equal(again.train_images, first.train_images)
    assert len(list(first.spec_dir.glob("*.npy"))) == 41  # the index still names the old one
    import_folder(index, dicom)  # the import sees the new mtime
    after = build_dataset(index, cache, input_size=32)
    assert (after.hits, after.misses) == (40, 0)
    entries = list(first.spec_dir.glob("*.npy"))
    assert len(entries) == 40  # the superseded entry was removed
    assert all(len(p.stem) == 32 and all(c in "0123456789abcdef" for c in p.stem) for p in entries)


def test_another_input_size_builds_a_new_spec_dir(site, tmp_path):
    index, _, _ = site
    a = build_dataset(index, tmp_path / "cache", input_size=32)
    b = build_dataset(index, tmp_path / "cache", input_size=40)
    c = build_dataset(index, tmp_path / "cache", input_size=32, preprocessing={"window": "file"})
    assert len({a.spec_dir, b.spec_dir, c.spec_dir}) == 3
    assert b.misses == 40 and b.train_images.shape[2:] == (40, 40)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [a.spec_hash, b.spec_hash, c.spec_hash]
    )


def test_an_unreadable_image_is_skipped_and_reported(site, tmp_path):
    index, dicom, _ = site
    bad = sorted(dicom.rglob("*.dcm"))[3]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 500])  # truncated pixel data, same SOP header
    ds = build_dataset(index, tmp_path / "cache", input_size=32)
    assert ds.n_train + ds.n_holdout == 39
    (skip,) = ds.skipped
    assert skip.code == "data.corrupt_pixels" and "Re-export" in skip.reason
    assert len(skip.study) == 12 and len(skip.image) == 12
    warm = build_dataset(index, tmp_path / "cache", input_size=32)
    assert warm.misses == 0 and [s.code for s in warm.skipped] == ["data.corrupt_pixels"]
    bad.unlink()
    gone = build_dataset(index, tmp_path / "cache", input_size=32)
    assert [s.code for s in gone.skipped] == ["data.missing"]


def test_no_label_no_dataset(site, tmp_path):
    index, _, _ = site
    with pytest.raises(DataError, match=r"No imported image has a 'other' label yet") as info:
        build_dataset(index, tmp_path / "cache", input_size=32, label_column="other")
    assert info.value.code == "data.empty"


def test_progress_and_cancel(site, tmp_path):
    index, _, _ = site
    seen: list[tuple[int, int]] = []
    with pytest.raises(TrainingCancelled, match="cancelled after 10 of 40"):
        build_dataset(
            index,
            tmp_path / "cache",
            input_size=32,
            progress=lambda d, t: seen.append((d, t)),
            should_stop=lambda: len(seen) >= 10,
        )
    assert seen[-1] == (10, 40)
    resumed = build_dataset(index, tmp_path / "cache", input_size=32)
    assert (resumed.hits, resumed.misses) == (10, 30)


def test_no_patient_id_in_the_labels_or_the_cache(site, tmp_path):
    index, dicom, src = site
    attach_labels(index, src.labels_csv, key="PatientID", label_column="label")
    build_dataset(index, tmp_path / "cache", input_size=32)
    ids = {p.name for p in dicom.iterdir()}  # the synthetic layout: dicom/<PatientID>/...
    assert ids and all(i.startswith("SYN-") for i in ids)
    # every stored value except file paths (which hold what the hospital named its folders)
    values = " ".join(
        str(v)
        for table in index.db.table_names()
        for row in index.db.table(table).rows
        for k, v in row.items()
        if k != "path"
    )
    names = " ".join(str(p.relative_to(tmp_path)) for p in (tmp_path / "cache").rglob("*"))
    cached = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*.*") if p.is_file())
    for ident in ids:
        assert ident not in values and ident not in names and ident.encode() not in cached


def test_the_train_worker_reads_the_index_with_the_sites_key(site, tmp_path):
    from shared.plan import demo_plan
    from site_client.core.train_worker import load_from_index

    index, _, _ = site
    key = tmp_path / "pseudonym.key"
    key.write_bytes(SECRET)
    plan = demo_plan(input_size=32)
    images, labels = load_from_index(index.path, key, tmp_path / "cache", plan, seed=0)
    assert images.shape[1:] == (1, 32, 32) and len(labels) == len(images) > 20
    with pytest.raises(DataError, match=r"pseudonymisation key .* cannot be read") as info:
        load_from_index(index.path, tmp_path / "nokey", tmp_path / "cache", plan, seed=0)
    assert info.value.code == "data.key"
    with pytest.raises(DataError, match="no imported images yet"):
        load_from_index(tmp_path / "none.db", key, tmp_path / "cache", plan, seed=0)


def test_a_warm_worker_keeps_its_dataset_until_the_index_changes(site, tmp_path):
    """The warm worker builds the dataset once for a round's training and validation and the
    rounds after; a relabelling committed by the site (another connection) is seen at once."""
    from shared.plan import demo_plan
    from site_client.core.train_worker import _INDEXES, load_from_index

    index, _, src = site
    key = tmp_path / "pseudonym.key"
    key.write_bytes(SECRET)
    plan = demo_plan(input_size=32)
    try:
        images, labels = load_from_index(
            index.path, key, tmp_path / "cache", plan, 0, keep_open=True
        )
        again, same = load_from_index(index.path, key, tmp_path / "cache", plan, 0, keep_open=True)
        assert again is images and np.array_equal(same, labels)
        held, _ = load_from_index(
            index.path, key, tmp_path / "cache", plan, 0, holdout=True, keep_open=True
        )
        other_seed, _ = load_from_index(
            index.path, key, tmp_path / "cache", plan, 1, keep_open=True
        )
        assert held is not images and other_seed is not images

        lines = src.labels_csv.read_text().splitlines()
        flipped = [lines[0]] + [
            ",".join([*row.split(",")[:-1], "1" if row.split(",")[-1] == "0" else "0"])
            for row in lines[1:]
        ]
        relabelled = tmp_path / "relabelled.csv"
        relabelled.write_text("\n".join(flipped) + "\n")
        attach_labels(index, relabelled)  # the site's own connection, not the worker's

        after, new_labels = load_from_index(
            index.path, key, tmp_path / "cache", plan, 0, keep_open=True
        )
        fresh, fresh_labels = load_from_index(index.path, key, tmp_path / "cache", plan, 0)
        assert after is not images and not np.array_equal(new_labels, labels)
        assert np.array_equal(after, fresh) and np.array_equal(new_labels, fresh_labels)
    finally:
        _INDEXES.close()
