"""autopipec-hpc: DFT data to a validated ACE potential."""


def __getattr__(name: str) -> str:
    # Looked up only when asked for: importlib.metadata and its scan of the installed
    # distributions cost 40 ms of every command's start.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("autopipec-hpc")
        except PackageNotFoundError:  # a source tree on sys.path, never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
