"""Where the ideal weights of simulated analog layers wait while their programmed copy is on the compute device.

Programming a hardware instance overwrites an analog layer's weights in place (see :mod:`.programmed_stack`), so
the compute device holds one copy of them, never two. The ideal weights are needed again to program the next seed
and to restore the digital model, so they are kept *off* the compute device:

- ``host``: a CPU tensor, pinned when the compute device is an accelerator (fast host-to-device copies). The
  default for models on CUDA (or any other non-CPU device).
- ``file``: a raw, already-unlinked temporary file, read back with plain ``readinto`` calls (no memory map, so the
  pages sit in the kernel's page cache, not in the process's resident set). The default for models on the CPU,
  where host memory *is* the compute device's memory.

``HETMOE_IDEAL_STORE=host|file`` overrides the choice and ``HETMOE_SPILL_DIR`` names the directory of the file
(default: the system's temporary directory). The stored bytes are the weights' own, in their dtype, so a restore
is bit-exact.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import TYPE_CHECKING, cast

import torch

from ..base.errors import HetMoEError

if TYPE_CHECKING:
    from typing_extensions import Buffer

STORE_ENV = "HETMOE_IDEAL_STORE"
SPILL_DIR_ENV = "HETMOE_SPILL_DIR"
KINDS = ("host", "file")


def store_kind(device: torch.device) -> str:
    """The store for weights computed on ``device``: ``$HETMOE_IDEAL_STORE`` if set, else file on CPU, host else."""
    kind = os.environ.get(STORE_ENV, "").strip().lower()
    if kind:
        if kind not in KINDS:
            raise HetMoEError(f"{STORE_ENV}={kind!r} is not a store; use one of {', '.join(KINDS)} (or unset it)")
        return kind
    return "file" if torch.device(device).type == "cpu" else "host"


class IdealStore:
    """Stacks of ideal weights ``[E, ...]`` by name, readable back a slice of the first dimension at a time."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise HetMoEError(f"unknown ideal-weight store {kind!r}; use one of {', '.join(KINDS)}")
        self.kind = kind
        self._host: dict[str, torch.Tensor] = {}
        self._layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}  # name -> (offset, shape, dtype)
        self._file: io.BufferedRandom | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> IdealStore:
        return cls(store_kind(device))

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a copy of ``tensor`` (any device) under ``name``."""
        tensor = tensor.detach()
        if self.kind == "host":
            pin = tensor.device.type != "cpu" and torch.cuda.is_available()
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            host.copy_(tensor)
            self._host[name] = host
            return
        f = self._open()
        offset = f.seek(0, os.SEEK_END)
        per = max(1, (64 << 20) // max(1, tensor[0].numel() * tensor.element_size())) if tensor.dim() else 1
        flat = tensor.reshape(1, -1) if tensor.dim() == 0 else tensor
        try:
            for i in range(0, flat.shape[0], per):  # bounded host staging for device tensors
                chunk = flat[i : i + per].contiguous().cpu()
                f.write(memoryview(cast("Buffer", chunk.view(torch.uint8).numpy())))  # numpy's stubs: a Buffer on 3.12+
        except OSError as exc:
            raise HetMoEError(
                f"cannot write the ideal-weight spill file ({exc.strerror}); free disk space or set "
                f"${SPILL_DIR_ENV} to a larger disk, or {STORE_ENV}=host to keep them in memory"
            ) from exc
        self._layout[name] = (offset, tuple(tensor.shape), tensor.dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._host[name].shape) if self.kind == "host" else self._layout[name][1]

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` into ``out`` (same dtype, any device); returns ``out``."""
        if self.kind == "host":
            return out.copy_(self._host[name][start:stop], non_blocking=True)
        offset, shape, dtype = self._layout[name]
        row = torch.Size(shape[1:]).numel() * dtype.itemsize
        buf = out if out.device.type == "cpu" and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        f = self._open()
        f.seek(offset + start * row)
        view = memoryview(cast("Buffer", buf.view(torch.uint8).numpy())).cast("B")
        if f.readinto(view) != (stop - start) * row:
            raise HetMoEError(
                f"ideal-weight store: short read of {name}; the spill file was truncated "
                f"(disk full? check ${SPILL_DIR_ENV})"
            )
        return buf if buf is out else out.copy_(buf)

    def close(self) -> None:
        """Drop every stored tensor (and the file)."""
        self._host.clear()
        self._layout.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> io.BufferedRandom:
        if self._file is None:
            directory = os.environ.get(SPILL_DIR_ENV) or None
            try:
                self._file = tempfile.TemporaryFile(prefix="hetmoe-ideal-", dir=directory)
            except OSError as exc:
                raise HetMoEError(
                    f"cannot create the ideal-weight spill file in {directory or tempfile.gettempdir()}"
                    f" ({exc.strerror}); set ${SPILL_DIR_ENV} to a writable directory, or "
                    f"{STORE_ENV}=host to keep the ideal weights in memory"
                ) from exc
        return self._file

    def __del__(self) -> None:  # the file is unlinked already; closing returns its space
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
