"""What every figure of the report draws with: matplotlib on the Agg backend (no display
needed), ``plt`` and :func:`png` (a figure as PNG bytes).
Every figure module of the wing draws through this one."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "png"]


def png(fig) -> bytes:
    """``fig`` as PNG bytes (110 dpi, tight bounding box); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
