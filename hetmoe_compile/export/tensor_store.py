"""Initializers of a captured ONNX graph, read from its external-data file only when needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class LazyTensor:
    """One initializer (or the ``index``-th slice along its first axis), loaded from disk by :meth:`load`."""

    store: TensorStore
    name: str
    index: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        full = self.store.shape(self.name)
        return full if self.index is None else full[1:]

    @property
    def dtype(self) -> np.dtype:
        return self.store.dtype(self.name)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return self.store.load(self.name, self.index)


class TensorStore:
    """The initializers of ``model`` (saved with external data under ``directory``)."""

    def __init__(self, model, directory: Path) -> None:
        self.directory = Path(directory)
        self.tensors: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensors[name].dims)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.tensors[name].data_type))

    def ref(self, name: str, index: int | None = None) -> LazyTensor:
        return LazyTensor(self, name, index)

    def load(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor (or its ``index``-th slice along axis 0); external data is read with one ``pread``."""
        t = self.tensors[name]
        shape, dtype = self.shape(name), self.dtype(name)
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location != TensorProto.EXTERNAL or dtype.kind not in "fiub":
            full = numpy_helper.to_array(t, str(self.directory))
            return full if index is None else np.ascontiguousarray(full[index])
        count = int(np.prod(shape[1:] if index is not None else shape, dtype=np.int64))
        offset = int(ext.get("offset", 0)) + (0 if index is None else index * count * dtype.itemsize)
        with open(self.directory / ext["location"], "rb") as fh:
            fh.seek(offset)
            data = fh.read(count * dtype.itemsize)
        out = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return out.reshape(shape[1:] if index is not None else shape)
