"""keras_lora's version (read by pyproject.toml and written into files)."""

VERSION = "0.1.0"
__version__ = VERSION
