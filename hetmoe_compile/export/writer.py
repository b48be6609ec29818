"""Write one partition as an ONNX file (external data above a size threshold) and check it."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import cast

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .expert_group_onnx import LazyArray
from .partition import Partition

EXTERNAL_DATA_THRESHOLD = 1 << 28
"""Partitions whose initializers exceed this many bytes (256 MiB) keep them in a ``.data`` file beside the model:
protobuf files cannot exceed 2 GB, and streaming tensors to a data file keeps the exporter's memory flat."""


def write_partition(
    part: Partition,
    directory: Path,
    filename: str,
    opsets: list,
    producer: str,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
    doc: str = "",
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``part`` to ``directory / filename`` with ``metadata`` in its ``metadata_props``; returns the files
    written (model first, then its data)."""
    path = directory / filename
    total = sum(int(cast("np.ndarray | LazyArray", a).nbytes) for a in part.initializers.values())
    external = total > threshold
    data_name = filename + ".data"
    initializers = []
    with open(directory / data_name, "wb") if external else nullcontext() as data:
        for name, src in part.initializers.items():
            array = src.load() if hasattr(src, "load") else src
            array = np.asarray(array, order="C")
            if external and array.nbytes >= 1024:
                assert data is not None  # opened when external
                t = TensorProto(
                    name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape)
                )
                offset = data.tell()
                data.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            else:
                t = numpy_helper.from_array(array, name)
            initializers.append(t)
            del array
    inputs = [_vi(part, n) for n in part.inputs]
    outputs = [_vi(part, n) for n in part.outputs]
    graph = helper.make_graph(part.nodes, part.name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=opsets, producer_name=producer, doc_string=doc)
    model.ir_version = 10
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.save_model(model, str(path))
    del model, graph, initializers
    onnx.checker.check_model(str(path), full_check=True)
    return [path, directory / data_name] if external else [path]


def _vi(part: Partition, name: str):
    if name in part.types:
        return part.types[name]
    raise ValueError(f"partition {part.name}: no type recorded for tensor '{name}'")
