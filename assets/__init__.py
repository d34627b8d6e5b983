"""Thin Dagster declarations over the refinery domain package, grouped by the story of the data."""
