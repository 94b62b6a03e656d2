"""Bundled offline tasks (no downloads): the procedural letter-sorting task of the offline demo."""
