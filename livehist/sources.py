"""Old import path, kept for outside code: use `livehist.engine.sources`."""

from livehist.engine.sources import *  # noqa: F403
from livehist.engine.sources import Source, SourceError, open_source  # noqa: F401
