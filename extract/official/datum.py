"""Reading the official DELF release's ``.datum`` files (the PCA mean, matrix and variances).

A ``.datum`` file is one serialised ``delf.protos.DatumProto`` (tensorflow/models research/delf
``protos/datum.proto``): field 1 ``shape``, a ``DatumShape`` whose field 1 holds the int64 dims;
field 2 ``float_list``, a ``FloatList`` whose field 1 holds the float32 values, row-major. Repeated
numbers may be packed (one length-delimited run) or not; both are read. Protocol-buffer wire
format: each field is a varint key ``number << 3 | wire type`` (0 varint, 1 fixed64, 2
length-delimited, 5 fixed32) and its value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from extract.errors import UserError

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class DatumError(UserError):
    """A ``.datum`` file that is missing or not a float DatumProto."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise DatumError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise DatumError("varint longer than 10 bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a serialised message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if pos + size > len(data):
                raise DatumError(f"field {number}: truncated")
            yield number, wire, data[pos:pos + size]
            pos += size
        elif wire == _BYTES:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise DatumError(f"field {number}: truncated ({size} bytes announced, {len(data) - pos} left)")
            yield number, wire, data[pos:pos + size]
            pos += size
        else:
            raise DatumError(f"field {number}: unsupported wire type {wire}")


def _dims(message: bytes) -> list[int]:
    dims: list[int] = []
    for number, wire, value in _fields(message):
        if number != 1:
            continue
        if wire == _VARINT:
            dims.append(int(value))  # type: ignore[arg-type]
        elif wire == _BYTES:
            pos, run = 0, value
            while pos < len(run):  # type: ignore[arg-type]
                dim, pos = _varint(run, pos)  # type: ignore[arg-type]
                dims.append(dim)
        else:
            raise DatumError(f"shape: dim has wire type {wire}")
    if any(d >= 1 << 63 for d in dims):
        raise DatumError(f"shape: negative dimension in {dims}")
    return dims


def _floats(message: bytes) -> np.ndarray:
    runs: list[bytes] = []
    for number, wire, value in _fields(message):
        if number != 1:
            continue
        if wire not in (_BYTES, _FIXED32) or (wire == _BYTES and len(value) % 4):  # type: ignore[arg-type]
            raise DatumError(f"float_list: values have wire type {wire} or a partial float")
        runs.append(value)  # type: ignore[arg-type]
    return np.frombuffer(b"".join(runs), dtype="<f4").astype(np.float32)


def parse_datum(data: bytes) -> np.ndarray:
    """The float32 array (its shape, row-major) a serialised DatumProto holds."""
    shape: list[int] | None = None
    values: np.ndarray | None = None
    for number, wire, value in _fields(data):
        if wire != _BYTES:
            raise DatumError(f"field {number} has wire type {wire}, not a message")
        if number == 1:
            shape = _dims(value)  # type: ignore[arg-type]
        elif number == 2:
            values = _floats(value)  # type: ignore[arg-type]
        else:
            raise DatumError(f"field {number}: not a float datum (only float_list is supported)")
    if shape is None or values is None:
        raise DatumError("no " + ("shape" if shape is None else "float_list") + " field")
    if int(np.prod(shape, dtype=np.int64)) != values.size:
        raise DatumError(f"shape {shape} needs {int(np.prod(shape))} values, the file holds {values.size}")
    return values.reshape(shape)


def read_datum(path: str | Path) -> np.ndarray:
    """:func:`parse_datum` of a file; :class:`DatumError` naming the file and the reason."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatumError(f"{path}: {e.strerror or e}") from None
    try:
        return parse_datum(data)
    except DatumError as e:
        raise DatumError(f"{path}: not a DatumProto file ({e})") from None
