"""The site's labelled images, split by patient into training and local hold-out sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.imaging import Rejected, load_labelled_folder, patient_split


@dataclass(frozen=True, slots=True)
class LocalDataset:
    train_images: np.ndarray
    train_labels: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    rejected: tuple[Rejected, ...]

    @classmethod
    def from_folder(
        cls,
        dicom_dir: Path,
        labels_csv: Path,
        *,
        input_size: int,
        holdout_fraction: float = 0.2,
        seed: int = 0,
    ) -> LocalDataset:
        data = load_labelled_folder(Path(dicom_dir), Path(labels_csv), input_size=input_size)
        train, holdout = patient_split(data.patient_ids, holdout_fraction, seed)
        return cls(
            train_images=data.images[train],
            train_labels=data.labels[train],
            holdout_images=data.images[holdout],
            holdout_labels=data.labels[holdout],
            rejected=data.rejected,
        )
