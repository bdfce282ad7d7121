"""livehist: live histograms of neutron and X-ray event streams for Tango and Sardana."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("livehist")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
