"""Prefect flows: thin, they wire tasks together."""
