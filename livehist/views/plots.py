"""PNG pictures of histograms (matplotlib, no display needed).

One panel per histogram: TOF kinds as step plots against the TOF axis with its unit,
images and pixel x TOF maps with a colour bar (log scale when counts span decades), and
ROIs outlined on the detector image of the same pixel layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MS_PER = {"ns": 1e-6, "us": 1e-3}


@dataclass
class Picture:
    """What one panel needs: counts, TOF edges (if any) and the spec as JSON."""

    name: str
    counts: np.ndarray
    edges: np.ndarray | None
    spec: dict


def _norm(counts: np.ndarray):
    from matplotlib.colors import LogNorm, Normalize

    positive = counts[counts > 0]
    if positive.size and positive.max() / max(positive.min(), 1) > 100:
        return LogNorm(vmin=max(positive.min(), 1), vmax=positive.max())
    return Normalize(vmin=0, vmax=max(int(counts.max()), 1))


def plot(pictures: list[Picture], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not pictures:
        raise ValueError("nothing to plot: no histograms given")
    n = len(pictures)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.6 * rows), squeeze=False)
    for ax, pic in zip(axes.ravel(), pictures, strict=False):
        kind = pic.spec.get("kind")
        total = int(pic.counts.sum())
        if pic.counts.ndim == 1:
            unit = pic.spec.get("tof", {}).get("unit", "ns")
            edges = pic.edges if pic.edges is not None else np.arange(pic.counts.size + 1)
            if unit in MS_PER and edges[-1] * MS_PER[unit] >= 1:  # long flight paths read best in ms
                edges, unit = edges * MS_PER[unit], "ms"
            ax.stairs(pic.counts, edges, fill=True, alpha=0.35, color="tab:blue")
            ax.stairs(pic.counts, edges, color="tab:blue")
            if pic.spec.get("tof", {}).get("scale") == "log":
                ax.set_xscale("log")
            ax.set_xlabel(f"time of flight ({unit})")
            ax.set_ylabel("counts per bin")
            ax.set_title(f"{pic.name} ({kind}): {total:,} counts")
        else:
            shown = pic.counts
            if shown.size > 4_000_000:  # never hand matplotlib a huge array: sum into blocks
                f = int(np.ceil(np.sqrt(shown.size / 4_000_000)))
                ny, nx = (shown.shape[0] // f) * f, (shown.shape[1] // f) * f
                shown = shown[:ny, :nx].reshape(ny // f, f, nx // f, f).sum(axis=(1, 3))
            im = ax.imshow(shown, origin="lower", aspect="auto", norm=_norm(shown),
                           cmap="viridis", interpolation="nearest")  # fmt: skip
            fig.colorbar(im, ax=ax, label="counts")
            if kind == "pixel_tof":
                ax.set_xlabel("TOF bin")
                ax.set_ylabel("pixel index")
            else:
                ax.set_xlabel("column")
                ax.set_ylabel("row")
            ax.set_title(f"{pic.name} ({kind}): {total:,} counts")
            if kind == "image":
                for roi in pictures:
                    r = roi.spec.get("roi") or {}
                    same = roi.spec.get("pixels") == pic.spec.get("pixels")
                    if roi.spec.get("kind") == "roi" and same and "rows" in r and shown is pic.counts:
                        (r0, r1), (c0, c1) = r["rows"], r["cols"]
                        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                                               edgecolor="red", linewidth=1.5))  # fmt: skip
                        ax.annotate(roi.name, (c0, r1), color="red", fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def from_device(proxy) -> list[Picture]:
    """Pictures of every histogram of an EventHistogrammer, read through Tango."""
    import json

    pictures = []
    for spec in json.loads(proxy.HistogramConfig):
        name = spec["name"]
        edges = proxy.read_attribute(f"{name}_edges").value if "tof" in spec else None
        pictures.append(Picture(name, np.asarray(proxy.read_attribute(name).value), edges, spec))
    return pictures


def from_nexus(path) -> dict[str, list[Picture]]:
    """Pictures of the histogram snapshots in each NXentry of a livehist NeXus file."""
    import json

    import h5py

    from livehist.recorders.nexus import snapshot_written

    out: dict[str, list[Picture]] = {}
    with h5py.File(path, "r") as f:
        for entry_name, entry in f.items():
            if not isinstance(entry, h5py.Group):  # a dataset at the root (not an NXentry): nothing to draw
                continue
            prov = entry.get("livehist")
            pictures = []
            for name, group in entry.items():
                if not isinstance(group, h5py.Group) or group.attrs.get("NX_class") not in (
                    "NXdata",
                    b"NXdata",
                ):
                    continue
                if name == "data" or prov is None or name not in prov:
                    continue
                if not isinstance(prov, h5py.Group) or not isinstance(prov[name], h5py.Group) \
                        or "spec" not in prov[name] or "data" not in group:  # fmt: skip
                    continue
                if not snapshot_written(prov[name]):
                    continue  # declared at scan start, never written (the scan did not get that far)
                spec = json.loads(prov[name]["spec"][()] or "{}")
                edges = group["time_of_flight"][()] if "time_of_flight" in group else None
                pictures.append(Picture(name, group["data"][()], edges, spec))
            if pictures:
                out[entry_name] = pictures
    return out


def plot_file(path, out_dir=None, say=print) -> list[Path]:
    """`livehist plot FILE.nxs`: one PNG per scan with histograms, beside the file (or in out_dir)."""
    path = Path(path)
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for entry, pictures in from_nexus(path).items():
        png = out_dir / f"{path.stem}_{entry}.png"
        plot(pictures, png, title=f"{path.name} /{entry}")
        say(f"{png}: {', '.join(p.name for p in pictures)}")
        written.append(png)
    if not written:
        raise ValueError(f"{path} holds no livehist histogram snapshots (record some with histo_count)")
    return written
