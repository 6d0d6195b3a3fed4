"""dcfx's version (what AOT packages record); `pyproject.toml` states the same."""

__version__ = "0.1.0"
