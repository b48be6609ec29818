"""A stack of analog matrices programmed in place: one copy of the weights on the compute device, never two.

:class:`ProgrammedStack` takes an ideal weight parameter ``[E, out, in]`` (or ``[out, in]``) and turns its
storage into the programmed tiles ``[E, out, C, T]`` of one hardware instance, in the parameter's dtype (the
per-row scales stay float32, they are ``1/T`` of the size). Programming runs a few matrices at a time: the ideal
values of a chunk are read, programmed in float32 (noise drawn and applied in float32), and written back in the
model's dtype, so the temporaries are bounded by :data:`~.pcm_fused.CHUNK_ELEMENTS` whatever the model's size.

What happens to the ideal values is the ``keep`` mode:

- ``"store"``: they go to an :class:`~.ideal_store.IdealStore` off the compute device (pinned host memory or an
  unlinked spill file) before the storage is reused; :meth:`ProgrammedStack.program` re-programs any seed from
  there and :meth:`ProgrammedStack.release` puts them back bit-exactly. The parameter is emptied (shape ``[0]``)
  while programmed, so a stray use of the ideal weights fails loudly instead of computing with noisy ones.
- ``"discard"``: the caller owns the tensor and no longer needs its ideal values (the ``torch.compile`` backend's
  own copies): the storage is reused and the ideal values are gone.
- ``"copy"``: the tensor belongs to someone else (an exported program's weights): programmed into a new buffer.

Where the input dimension does not split into equal tiles (``C * T > in``, e.g. 1408 inputs on 512-wide tiles) the
padded tiles need a larger buffer: the old storage is freed first in ``"store"`` mode (peak unchanged), and after
programming in ``"discard"`` mode (one stack more for the time of one stack's programming).
"""

from __future__ import annotations

import contextlib

import torch

from ..base.host_memory import bounded_allocator
from .config import AnalogConfig
from .ideal_store import IdealStore
from .pcm_fused import CHUNK_ELEMENTS
from .tiles import program_matrices, split_sizes

KEEP_MODES = ("store", "discard", "copy")


class ProgrammedStack:
    """The programmed tiles of one weight stack; ``weight [E, out, C, T]`` (model dtype), ``scale [E, out, C]``."""

    def __init__(
        self, param: torch.Tensor, tile_size: int, keep: str = "store", store: IdealStore | None = None, name: str = "w"
    ) -> None:
        if keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
        if keep == "store" and store is None:
            raise ValueError("keep='store' needs an IdealStore")
        self.param, self.keep, self.store, self.name = param, keep, store, name
        self.ideal_shape = tuple(param.shape)
        data = param.detach()
        if not data.is_contiguous():
            data = data.contiguous()
        # [E, out, in]; kept only in "discard"/"copy"
        self._ideal: torch.Tensor | None = data.reshape(-1, *self.ideal_shape[-2:])
        e, out, n_in = self._ideal.shape
        count, size = split_sizes(n_in, tile_size)
        self.tiled_shape = (e, out, count, size)
        self.reuses = keep != "copy" and count * size == n_in
        dtype, device = data.dtype, data.device
        if keep == "store":
            assert store is not None  # checked above
            store.put(name, self._ideal)
            self._ideal = None
            param.data = torch.empty(0, dtype=dtype, device=device)
        self.weight: torch.Tensor | None  # None once released
        self.scale: torch.Tensor | None
        if self.reuses:
            self.weight = data.view(self.tiled_shape)
        else:
            del data  # in "store" mode the old storage is freed before the padded buffer is allocated
            self.weight = torch.empty(self.tiled_shape, dtype=dtype, device=device)
        self.scale = torch.empty(self.tiled_shape[:3], dtype=torch.float32, device=device)

    @property
    def count(self) -> int:
        return self.tiled_shape[0]

    def _chunk(self) -> int:
        return max(1, CHUNK_ELEMENTS // max(1, self.tiled_shape[1] * self.tiled_shape[2] * self.tiled_shape[3]))

    def _tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, scale)``; a released stack has none."""
        if self.weight is None or self.scale is None:
            raise RuntimeError(f"{self.name}: the programmed stack was released")
        return self.weight, self.scale

    def _read(self, start: int, stop: int) -> torch.Tensor:
        if self.keep == "store":
            weight, _ = self._tiles()
            assert self.store is not None  # keep="store" comes with a store (checked in __init__)
            buf = torch.empty((stop - start, *self.ideal_shape[-2:]), dtype=weight.dtype, device=weight.device)
            return self.store.read(self.name, start, stop, buf)
        if self._ideal is None:
            raise RuntimeError(f"{self.name}: the ideal weights were discarded after the first programming")
        chunk = self._ideal[start:stop]
        return chunk.clone() if self.reuses else chunk

    @torch.no_grad()
    def program(self, cfg: AnalogConfig, seeds: list[int]) -> None:
        """Program hardware instance ``seeds[e]`` of every matrix ``e`` (chunk by chunk, in place)."""
        if len(seeds) != self.count:
            raise ValueError(f"{self.name}: {len(seeds)} seeds for {self.count} matrices")
        per = self._chunk()
        weight, scale = self._tiles()
        bounded = bounded_allocator() if weight.device.type == "cpu" else contextlib.nullcontext()
        with bounded:  # chunk temporaries go back to the system when freed
            for i in range(0, self.count, per):
                j = min(self.count, i + per)
                prog = program_matrices(self._read(i, j), cfg, seeds[i:j])
                weight[i:j].copy_(prog.weight)
                scale[i:j].copy_(prog.scale)
                del prog
        if self.keep == "discard":
            self._ideal = None  # reused storage now holds programmed values; a padded copy's old one is freed

    @torch.no_grad()
    def release(self) -> None:
        """Put the ideal weights back into the parameter (``"store"`` mode; bit-exact) and drop the programmed
        tiles (whoever else holds them should drop them first, so a padded buffer is freed before the ideal
        weights are allocated). The stack is unusable afterwards."""
        if self.keep != "store" or self.weight is None:
            return
        if self.reuses:
            ideal = self.weight.view(self.ideal_shape)
        else:
            self.weight = None
            ideal = torch.empty(self.ideal_shape, dtype=self.param.dtype, device=self.param.device)
        self.weight = self.scale = None
        assert self.store is not None  # keep="store" comes with a store (checked in __init__)
        self.store.read(
            self.name,
            0,
            ideal.numel() // (self.ideal_shape[-1] * self.ideal_shape[-2]),
            ideal.view(-1, *self.ideal_shape[-2:]),
        )
        self.param.data = ideal  # the same parameter object, its module unchanged
