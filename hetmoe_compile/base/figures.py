"""Figures written the way every output is: to a temporary sibling, then renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` atomically (120 dpi, tight bounding box)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
