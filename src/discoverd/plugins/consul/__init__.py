"""Placeholder while the consul plugin is written: announces nothing yet."""
