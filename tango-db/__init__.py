"""The Tango database side of livehist: the embedded DB and the dsconfig configuration."""

from pathlib import Path

DEFAULT_CONFIG = Path(__file__).with_name("livehist.json")
