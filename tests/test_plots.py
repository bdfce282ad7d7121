"""PNG pictures of histograms: every kind, huge images downsampled, empty input refused."""

from __future__ import annotations

import time

import matplotlib.image
import numpy as np
import pytest

from livehist.views.plots import Picture, plot


def test_every_kind_and_a_huge_image(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {"first": 1, "shape": [64, 64]}
    pics = [
        Picture("tof", rng.integers(0, 100, 500), np.linspace(0, 7e7, 501),
                {"kind": "tof", "tof": {"unit": "ns"}}),
        Picture("image", rng.integers(0, 1000, (64, 64)), None, {"kind": "image", "pixels": pixels}),
        Picture("beam", rng.integers(0, 9, 50), np.geomspace(1, 7e4, 51),
                {"kind": "roi", "pixels": pixels, "roi": {"rows": [20, 40], "cols": [10, 30]},
                 "tof": {"unit": "us", "scale": "log"}}),
        Picture("pixel_tof", rng.integers(0, 5, (200, 40)), np.arange(41.0), {"kind": "pixel_tof"}),
        Picture("big", np.ones((4000, 4000), np.int64), None, {"kind": "image"}),
    ]  # fmt: skip
    t0 = time.monotonic()
    path = plot(pics, tmp_path / "h.png", title="all kinds")
    assert time.monotonic() - t0 < 30  # a 16-Mpixel image is summed into blocks, never frozen on
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 500 and img[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="nothing to plot"):
        plot([], tmp_path / "none.png")


def test_panel_downsamples_huge_images_for_display():
    from livehist.views.panel import downsample

    image = np.arange(3000 * 2000, dtype=np.int64).reshape(3000, 2000)
    shown = downsample(image, 1024)
    assert shown.shape == (1000, 666) and shown.sum() == image[:, :1998].sum()  # block sums keep the counts
    assert downsample(image).shape == (500, 333)  # the panel's default: at most 512 per side
    small = np.ones((128, 128))
    assert downsample(small) is small
