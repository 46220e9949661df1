"""glucoagent device agent."""

__all__ = ["__version__"]
__version__ = "0.1.0"  # equal to pyproject.toml (tests/system/test_version.py); the .ipk carries no metadata
