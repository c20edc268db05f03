"""Watermarks the victim embeds in its outputs (see docs/defenses.md).

- :mod:`defenses.watermark.trace`: ``trace_watermark``, a per-client payload in every output that names the
  API key a leaked output was served to (``heist defend trace``).
- :mod:`defenses.watermark.ownership`: ``ownership_watermark``, a keyed signal a surrogate trained on the
  outputs learns, tested with an exact z-test (``heist defend verify``).
"""
