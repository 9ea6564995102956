"""The package version (its own module, so that writers of files can record it without importing
the package's ``__init__``)."""

__version__ = "0.1.0"
