"""Watermark defenses: marks on served outputs that later prove where an output or a model came from."""
