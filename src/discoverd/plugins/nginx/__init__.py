"""Placeholder while the nginx plugin is written: announces nothing yet."""
