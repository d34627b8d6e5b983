"""refinery: the Dagster-free domain package (one module per stage)."""

__version__ = "0.1.0"
