"""Output files of the harnesses: atomic writes and the latency plot.

Every output goes through ``deployopt.core.io``'s atomic writer (temporary file in the destination
folder, then os.replace), so a killed run never leaves a half-written JSON or PNG that a CI step
would then read.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable

from deployopt.core.errors import UserError
from deployopt.core.io import atomic_write_bytes, atomic_write_text, check_output_path


def check_writable(path: str | os.PathLike, what: str, inputs: Iterable[str | os.PathLike] = ()) -> pathlib.Path:
    """Refuse an output path that cannot be written or is one of the ``inputs`` the command
    reads, before any long work starts."""
    try:
        return check_output_path(path, inputs=inputs)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_text(path, text)


def plot_latency(rows: list[dict], path: str | os.PathLike,
                 accuracy: dict[str, float] | None = None) -> None:
    """PNG: per-run latency distribution of each row (violin + median); with ``accuracy``
    ({model label: top-1}) a second panel puts each model at (p50 latency, accuracy)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("error") is None and r.get("samples_ms")]
    configs = sorted({(r["threads"], r["batch"]) for r in rows})
    multi_config = len(configs) > 1
    panels = 2 if accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6.0, 1.2 * len(rows) + 2) + 4 * (panels - 1),
                                                 4.5), squeeze=False)
    ax = axes[0][0]
    names = [r["model"] + (f"\nT{r['threads']} B{r['batch']}" if multi_config else "")
             for r in measured]
    if measured:
        data = [r["samples_ms"] for r in measured]
        parts = ax.violinplot(data, showmedians=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_alpha(0.5)
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    failed = [r["model"] for r in rows if r.get("error") is not None]
    title = "per-run latency"
    if failed:
        title += f" (failed: {', '.join(sorted(set(failed)))})"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("latency per run (ms)")
    ax.grid(axis="y", alpha=0.3)

    if accuracy:
        ax2 = axes[0][1]
        for threads, batch in configs:
            points = [(r["p50_ms"], accuracy[r["model"]], r["model"]) for r in measured
                      if (r["threads"], r["batch"]) == (threads, batch) and r["model"] in accuracy]
            if not points:
                continue
            xs, ys, labels = zip(*points)
            ax2.scatter(xs, ys, label=f"threads={threads} batch={batch}")
            for x, y, label in points:
                ax2.annotate(label, (x, y), fontsize=8, xytext=(3, 3),
                             textcoords="offset points")
        ax2.set_xlabel("p50 latency (ms)")
        ax2.set_ylabel("accuracy (top-1)")
        ax2.set_title("latency vs accuracy", fontsize=10)
        ax2.grid(alpha=0.3)
        if multi_config:
            ax2.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
