"""The validation's keys on a training record (a base of ``store.records.RecordValues``):
the validate job's id and the headline figures of ``ValidationReport.headline``."""

from __future__ import annotations

from pydantic import BaseModel


class ValidationValues(BaseModel):
    validate_job: str | None = None  # the submission's (submission.py)
    validation: str | None = None  # "passed", or the failed properties
    validation_wall_time_s: float | None = None
    # The element the figures below are of: the first of the potential's; validation.json has them all.
    validation_element: str | None = None
    validation_a0: float | None = None  # Angstrom, conventional cubic edge
    validation_b0_gpa: float | None = None
    validation_c11_gpa: float | None = None
    validation_c12_gpa: float | None = None
    validation_c44_gpa: float | None = None
    validation_vacancy_ev: float | None = None
    validation_md_min_distance: float | None = None  # the closest pair in the hot MD, Angstrom
    validation_md_drift: float | None = None  # NVE energy drift, meV/atom/ps
