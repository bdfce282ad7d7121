"""Old import path, kept for outside code: use `livehist.engine.spec`."""

from livehist.engine.spec import *  # noqa: F403
from livehist.engine.spec import SpecError, parse_histograms  # noqa: F401
