"""A site's local dataset: its labelled DICOM folder, split by patient into train and hold-out.

A thin wrapper over :mod:`shared.imaging`, so the site trains and validates on exactly the
inputs the demo's baselines and the benchmarks use. No Qt here (DESIGN.md, dependency rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.imaging import LabelledImages, Rejected, load_labelled_folder, patient_split


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalDataset:
    """Train and hold-out arrays (``(N, 1, S, S)`` float32 images, ``(N,)`` float32 labels);
    the hold-out holds whole patients, so the site's validation never sees a training patient.
    """

    data: LabelledImages
    train_idx: np.ndarray
    holdout_idx: np.ndarray

    @classmethod
    def from_folder(
        cls,
        dicom_dir: Path,
        labels_csv: Path,
        *,
        input_size: int,
        holdout_fraction: float = 0.2,
        seed: int = 0,
        label_column: str = "label",
    ) -> LocalDataset:
        data = load_labelled_folder(
            dicom_dir, labels_csv, input_size=input_size, label_column=label_column
        )
        train_idx, holdout_idx = patient_split(data.patient_ids, holdout_fraction, seed)
        return cls(data=data, train_idx=train_idx, holdout_idx=holdout_idx)

    @property
    def train_images(self) -> np.ndarray:
        return self.data.images[self.train_idx]

    @property
    def train_labels(self) -> np.ndarray:
        return self.data.labels[self.train_idx]

    @property
    def holdout_images(self) -> np.ndarray:
        return self.data.images[self.holdout_idx]

    @property
    def holdout_labels(self) -> np.ndarray:
        return self.data.labels[self.holdout_idx]

    @property
    def rejected(self) -> tuple[Rejected, ...]:
        return self.data.rejected

    def __len__(self) -> int:
        return len(self.data)
