"""autopipec-hpc: DFT data to a validated ACE potential."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("autopipec-hpc")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
