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


def test_panel_scales_move_in_nice_steps_not_with_every_update():
    from livehist.views.panel import NICE, nice_top

    assert [nice_top(v) for v in (0, 0.2, 1, 1.01, 7, 9.5, 11, 119, 120.5, 999, 1001)] == [
        1, 1, 1, 1.2, 8, 10, 12, 120, 150, 1000, 1200]  # fmt: skip
    assert nice_top(2.5e9) == 2.5e9 and nice_top(np.int64(3_000_001)) == 4e6
    # counts growing one by one from 1 to 10^6 move a scale only 6 x 10 times, never down
    tops = [nice_top(v) for v in range(1, 1_000_001, 7)]
    assert len(set(tops)) <= 6 * (len(NICE) - 1) + 1 and tops == sorted(tops)
    assert all(t >= v for t, v in zip(tops, range(1, 1_000_001, 7), strict=True))
