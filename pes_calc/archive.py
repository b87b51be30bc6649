"""Integrity of compiled artefacts (``.pt`` TorchScript, ``.pt2`` AOTInductor).

Both are zip archives. Zip's own CRC-32s cover the members' bytes but not the
headers, padding and directory around them, so a damaged byte there can go
unseen. `seal` therefore writes a SHA-256 of every byte of the archive into the
zip comment (the one field at the very end that readers skip), and `check_archive`
recomputes it. Archives written before seals get the CRC check and a warning.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
import zipfile
from pathlib import Path

from pes_calc.io import ModelFileError

__all__ = ["SEAL_PREFIX", "check_archive", "seal"]

SEAL_PREFIX = b"pes_calc sha256 "
_END_RECORD = b"PK\x05\x06"  # zip's end-of-central-directory signature
_END_RECORD_SIZE = 22  # its fixed part; the comment length is its last 2 bytes
_SEAL_SIZE = len(SEAL_PREFIX) + 64  # the prefix and a hex SHA-256


def seal(path: str | os.PathLike) -> None:
    """Append the archive's SHA-256 to ``path`` as its zip comment.

    The digest covers every byte before it, the comment's length field included.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data[-_END_RECORD_SIZE:]
    if end[:4] != _END_RECORD or end[-2:] != b"\x00\x00":
        raise ModelFileError(
            f"{path}: not a zip archive without a comment; cannot seal"
        )
    sealed = data[:-2] + struct.pack("<H", _SEAL_SIZE) + SEAL_PREFIX
    digest = hashlib.sha256(sealed).hexdigest().encode()
    path.write_bytes(sealed + digest)


def _stored_seal(data: bytes) -> tuple[bytes, bytes] | None:
    """(the bytes the seal covers, the stored hex digest), or None if unsealed."""
    start = len(data) - _SEAL_SIZE - _END_RECORD_SIZE
    if start < 0 or data[start : start + 4] != _END_RECORD:
        return None
    comment = data[-_SEAL_SIZE:]
    length = struct.unpack("<H", data[-_SEAL_SIZE - 2 : -_SEAL_SIZE])[0]
    if length != _SEAL_SIZE or not comment.startswith(SEAL_PREFIX):
        return None
    return data[:-64], comment[len(SEAL_PREFIX) :]


def check_archive(path: str | os.PathLike, sealed: bool) -> None:
    """Raise `ModelFileError` if the archive at ``path`` is damaged.

    ``sealed``: whether its metadata says a seal was written (then a missing or
    wrong seal is damage). Unsealed archives get zip's CRC-32 check and a warning.
    """
    path = Path(path)
    data = path.read_bytes()
    stored = _stored_seal(data)
    if stored is not None:
        covered, digest = stored
        if hashlib.sha256(covered).hexdigest().encode() != digest:
            raise ModelFileError(
                f"{path}: its bytes do not match the SHA-256 written with them "
                "(the file is damaged)"
            )
        return
    if sealed:
        raise ModelFileError(
            f"{path}: the SHA-256 written at the end of the archive is missing or "
            "damaged (the file is damaged or was cut short)"
        )
    warnings.warn(
        f"{path} was compiled before pes_calc sealed archives: only zip's CRC-32s "
        "are checked (compile it again to seal it)",
        stacklevel=3,
    )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:  # zipfile reports broken headers in several ways
        raise ModelFileError(f"{path}: the archive is damaged: {error}") from error
    if damaged is not None:
        raise ModelFileError(
            f"{path}: member {damaged} does not match its checksum (the file is "
            "damaged)"
        )
