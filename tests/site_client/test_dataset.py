"""The site's local dataset over a small synthetic site."""

from __future__ import annotations

import numpy as np

from shared.synthetic import generate_federation
from site_client.core.dataset import LocalDataset


def test_local_dataset_splits_a_synthetic_site_by_patient(tmp_path):
    m = generate_federation(
        tmp_path, sites=1, seed=2, images_per_site=20, test_images=0, image_size=32
    )
    site = m.sites[0]
    ds = LocalDataset.from_folder(site.dicom_dir, site.labels_csv, input_size=32, seed=1)
    assert len(ds) == 20
    assert ds.train_images.shape[1:] == (1, 32, 32) and ds.train_images.dtype == np.float32
    assert len(ds.train_labels) + len(ds.holdout_labels) == 20
    assert len(ds.holdout_labels) > 0 and len(ds.train_labels) > len(ds.holdout_labels)
    assert set(np.unique(np.concatenate([ds.train_labels, ds.holdout_labels]))) <= {0.0, 1.0}
    train_p = {ds.data.patient_ids[i] for i in ds.train_idx}
    hold_p = {ds.data.patient_ids[i] for i in ds.holdout_idx}
    assert not train_p & hold_p
    assert ds.rejected == ()
    same = LocalDataset.from_folder(site.dicom_dir, site.labels_csv, input_size=32, seed=1)
    np.testing.assert_array_equal(same.holdout_idx, ds.holdout_idx)
