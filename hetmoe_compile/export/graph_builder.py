"""A small ONNX graph builder: nodes and numpy initializers under one name prefix (no torch)."""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike
from onnx import NodeProto, helper


class Deferred:
    """An initializer computed only when its partition is written, so large weights never pile up in memory."""

    def __init__(self, shape: tuple[int, ...], dtype, fn) -> None:
        self.shape, self.dtype, self._fn = tuple(shape), np.dtype(dtype), fn

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return self._fn()


def materialize(array) -> np.ndarray:
    """A numpy array from a numpy array, a lazy tensor or a :class:`Deferred`."""
    return array.load() if hasattr(array, "load") else np.asarray(array)


class GraphBuilder:
    """Collects nodes and initializers; every name it makes starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[NodeProto] = []
        self.initializers: dict[str, object] = {}  # numpy arrays or lazy tensors
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, name: str, array, public: bool = False) -> str:
        """An initializer: ``array`` is a numpy array or a lazy tensor (``shape``, ``dtype``, ``load()``).
        A ``public`` name is kept verbatim (the name a toolchain sees); others get the prefix."""
        full = name if public else self.prefix + name
        if full in self.initializers:
            raise ValueError(f"initializer '{full}' defined twice")
        self.initializers[full] = array if hasattr(array, "load") else np.asarray(array, order="C")
        return full

    def scalar(self, value: float | int, dtype: DTypeLike) -> str:
        return self.const(f"c{self._next()}", np.asarray(value, dtype=dtype))

    def vector(self, values: list[int]) -> str:
        return self.const(f"c{self._next()}", np.asarray(values, dtype=np.int64))

    def array(self, values: np.ndarray) -> str:
        """An anonymous constant of ``values`` (its dtype kept)."""
        return self.const(f"c{self._next()}", values)

    def _next(self) -> int:
        self._count += 1
        return self._count

    def op(
        self, op_type: str, inputs: list[str], hint: str | None = None, outputs: list[str] | None = None, **attrs
    ) -> str:
        """Append one single-output node; returns its output name."""
        return self.multi_op(op_type, inputs, 1, hint, outputs, **attrs)[0]

    def multi_op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int,
        hint: str | None = None,
        outputs: list[str] | None = None,
        **attrs,
    ) -> list[str]:
        """Append one node with ``n_out`` outputs; returns their names."""
        outs = outputs or [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs))
        return outs
