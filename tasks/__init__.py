"""Prefect tasks: thin wrappers that call the soundpatch core."""
