"""Benchmarks that print Markdown tables: each runs the thing and its baseline side by side."""
