"""Files written whole or not at all: the one atomic writer behind every file medmtl writes.

A file is written under a hidden temporary name in its own folder and then renamed (or, when nothing may be
replaced, hard-linked) into place, so a reader, or a run killed at any moment, sees the old file or the new
one and never a partial one.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from medmtl.errors import MedmtlError

__all__ = ["atomic_write", "atomic_write_text", "display_path", "temp_name", "stale_temp_files"]


def display_path(path: Path | str) -> str:
    """A path as text that can always be printed and written to JSON.

    File names are bytes on Linux; a name in another encoding (Latin-1 ``caf\\xe9.nii.gz``) reaches Python as
    lone surrogates, which no UTF-8 stream or file accepts. They are shown as ``\\xe9`` escapes.

    Args:
        path: the path.

    Returns:
        valid Unicode text, the same as ``str(path)`` for every UTF-8 name.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def temp_name(path: Path) -> Path:
    """The hidden temporary file that `atomic_write` writes before `path` appears.

    It lies in `path`'s folder (a rename is only atomic within one file system) and ends with `path`'s
    suffixes, so writers that choose a format by suffix (nibabel's ``.nii.gz``) behave as for the real name.

    Args:
        path: the file to be written.

    Returns:
        ``.<name>.<random>.tmp<suffixes>`` beside `path`.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{''.join(path.suffixes)}")


def atomic_write(
    path: Path | str, write: Callable[[Path], object], *, overwrite: bool = True, durable: bool = False
) -> Path:
    """Write `path` through a temporary file in its folder, then move it into place in one step.

    Args:
        path: the file to write; its folder is created.
        write: writes the content to the path it is given (the temporary file), e.g.
            ``lambda tmp: nib.save(image, tmp)``.
        overwrite: replace an existing `path`. Without it the file is linked into place, which fails if
            something appeared there meanwhile, instead of being renamed over it.
        durable: fsync the file and its folder, so that it also survives a power loss (checkpoints).

    Returns:
        the path written.

    Raises:
        MedmtlError: `path` exists (without `overwrite`), or its folder cannot be created or written.
        Exception: whatever `write` raises other than OSError; nothing is left behind.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise MedmtlError(f"{path}: already exists; refusing to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedmtlError(f"{path.parent}: cannot create the output folder ({err.strerror or err})") from None
    tmp = temp_name(path)
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_into_place(tmp, path)
    except OSError as err:
        raise MedmtlError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync(path.parent)  # the rename itself survives a power loss
    return path


def atomic_write_text(path: Path | str, text: str, *, overwrite: bool = True, durable: bool = False) -> Path:
    """`atomic_write` of UTF-8 text.

    Args:
        path: the file to write.
        text: its content.
        overwrite: replace an existing file (see `atomic_write`).
        durable: fsync the file and its folder (see `atomic_write`).

    Returns:
        the path written.
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite,
                        durable=durable)


def _link_into_place(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic and never replaces an existing file
    except FileExistsError:
        raise MedmtlError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError:
        # file systems without hard links: a small window between the check and the rename remains
        if path.exists():
            raise MedmtlError(f"{path}: already exists; refusing to overwrite it") from None
        os.replace(tmp, path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(folder: Path | str, names: Iterable[str]) -> list[Path]:
    """Temporary files that `atomic_write` left when its process was killed mid-write.

    They are never read (readers open only the final names), so they are harmless, only wasted space. Both
    ``.<name>.<random>.tmp<suffixes>`` and the older ``.<name>.<random>.tmp`` are found.

    Args:
        folder: the folder to look in.
        names: the final file names whose temporary files to look for, e.g. ``("model.pt", "last.pt")``.

    Returns:
        the matching files, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [
        re.compile(rf"^\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp(?:{re.escape(''.join(Path(name).suffixes))})?$")
        for name in names
    ]
    return sorted(p for p in folder.iterdir() if p.is_file() and any(r.match(p.name) for r in patterns))
