"""Choosing series from an export: `SeriesRule` (modality, description, size, UID; never a localizer unless
named) and `select_series`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from medmtl.data.dicom.info import SeriesInfo
from medmtl.errors import MedmtlError


@dataclass
class SeriesRule:
    """Which series to take from an export. All filters set must hold (AND).

    Localizers are never selected unless named by `series_uid`; `largest` then keeps the series with the most
    voxels among those left.
    """

    modality: str | None = None
    description: str | None = None  # regular expression, case-insensitive search
    min_slices: int | None = None
    largest: bool = False
    series_uid: str | None = None

    def __post_init__(self) -> None:
        self._pattern()  # an invalid regular expression is a user error: report it before any work

    def _pattern(self) -> re.Pattern | None:
        if self.description is None:
            return None
        try:
            return re.compile(self.description, re.IGNORECASE)
        except re.error as err:
            message = f"--description {self.description!r}: invalid regular expression ({err})"
            raise MedmtlError(message) from None

    def is_set(self) -> bool:
        """Whether any filter is set.

        Returns:
            True when the rule restricts the series in any way.
        """
        filters = (self.modality, self.description, self.min_slices, self.series_uid)
        return self.largest or any(v is not None for v in filters)

    def describe(self) -> str:
        """The rule in words, for messages.

        Returns:
            e.g. ``modality=MR, description~/t1/, min_slices=20, largest``.
        """
        parts = []
        if self.series_uid is not None:
            parts.append(f"series_uid={self.series_uid}")
        if self.modality is not None:
            parts.append(f"modality={self.modality}")
        if self.description is not None:
            parts.append(f"description~/{self.description}/")
        if self.min_slices is not None:
            parts.append(f"min_slices={self.min_slices}")
        if self.largest:
            parts.append("largest")
        return ", ".join(parts) or "any series"

    def matches(self, s: SeriesInfo) -> bool:
        """Whether one series passes the filters (`largest` is applied by `select_series`).

        Args:
            s: the series to test.

        Returns:
            True when every filter set holds for `s`.
        """
        if self.series_uid is not None:
            if s.series_uid != self.series_uid:
                return False
        elif s.is_localizer:
            return False
        if self.modality is not None and s.modality.upper() != self.modality.upper():
            return False
        pattern = self._pattern()
        if pattern is not None and not pattern.search(s.description):
            return False
        return self.min_slices is None or s.num_slices >= self.min_slices


def select_series(series: Sequence[SeriesInfo], rule: SeriesRule) -> list[SeriesInfo]:
    """The series that a rule selects.

    Args:
        series: candidates, e.g. from `discover_series`.
        rule: the filters.

    Returns:
        The matching series in their input order; at most one when `rule.largest` is set.

    Raises:
        MedmtlError: when the description is not a valid regular expression.
    """
    kept = [s for s in series if rule.matches(s)]
    if rule.largest and kept:
        kept = [max(kept, key=lambda s: s.num_voxels)]  # max keeps the first of equal sizes
    return kept
