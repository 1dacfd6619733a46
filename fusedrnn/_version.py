"""The version of fusedrnn, written once: pyproject.toml reads it from here without importing the
package (which imports torch)."""

__version__ = "0.1.0"
