"""The event engine: events and their decoding, histogram specs, compiled kernels, the
accumulating pipeline, image previews, event sources and the event publisher.

Plain Python and numba only: nothing here imports Tango, Sardana or Qt, and nothing here
imports from the other layers of livehist (tests/test_layers.py checks both).
"""

from livehist.engine.pipeline import Engine, Snapshot
from livehist.engine.sources import open_source
from livehist.engine.spec import parse_histograms

__all__ = ["Engine", "Snapshot", "open_source", "parse_histograms"]
