"""Silencing third-party warnings and loggers where they would mislead a user or leak patient data."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# MONAI's nvImageCodec DICOM plugin warns on every reader construction when nvImageCodec is absent (any CPU)
MONAI_READER_NOISE = "monai.data.nvimgcodec_pydicom_plugin"


@contextlib.contextmanager
def silenced(*logger_names: str) -> Iterator[None]:
    """Silence all warnings and the named loggers for the duration.

    pydicom and highdicom warn and log about malformed values and may quote them, patient names included;
    medmtl's own messages say what is wrong instead.

    Args:
        logger_names: loggers to mute (their previous levels are restored afterwards).
    """
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
