"""Read an ONNX file's ``metadata_props`` and ``doc_string`` without onnx or loading its graph (no torch).

An ONNX model is a protobuf ``ModelProto``; its top-level fields are walked and every field but ``doc_string``
(6) and ``metadata_props`` (14) is skipped by its length, so the graph and inline weights are never read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DOC_STRING, METADATA_PROPS = 6, 14  # ModelProto field numbers
_KEY, _VALUE = 1, 2  # StringStringEntryProto field numbers


def _varint(fh: BinaryIO) -> int:
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise ValueError("truncated protobuf varint")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def _fields(fh: BinaryIO, end: int, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
    """``(field number, payload)`` of the length-delimited fields in ``wanted`` up to byte ``end``."""
    while fh.tell() < end:
        key = _varint(fh)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _varint(fh)
        elif wire in (1, 5):
            fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            size = _varint(fh)
            if field in wanted:
                data = fh.read(size)
                if len(data) != size:
                    raise ValueError("truncated protobuf field")
                yield field, data
            else:
                fh.seek(size, os.SEEK_CUR)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    if fh.tell() != end:
        raise ValueError("truncated protobuf message")


def read_model_props(path: str | Path) -> tuple[dict[str, str], str]:
    """``(metadata_props, doc_string)`` of the ONNX model file ``path``; ``ValueError`` if it is not protobuf."""
    props: dict[str, str] = {}
    doc = ""
    with open(path, "rb") as fh:
        for field, data in _fields(fh, os.fstat(fh.fileno()).st_size, {DOC_STRING, METADATA_PROPS}):
            if field == DOC_STRING:
                doc = data.decode("utf-8", "replace")
                continue
            entry = dict(_fields(io.BytesIO(data), len(data), {_KEY, _VALUE}))
            props[entry.get(_KEY, b"").decode("utf-8", "replace")] = entry.get(_VALUE, b"").decode("utf-8", "replace")
    return props, doc
