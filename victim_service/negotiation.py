"""Content negotiation for the translate route: which image format to answer with (``Accept``)."""

from __future__ import annotations

from translators.codecs import ImageFormat
from translators.errors import ImageError

OUTPUT_TYPES: dict[str, ImageFormat] = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_ORDER: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")  # preference on equal q (PNG: lossless)


def negotiate(accept: str | None) -> ImageFormat:
    """The output format for an ``Accept`` header (RFC 9110 section 12.5.1 q-values; most specific range wins).

    No header, ``*/*`` or ``image/*`` -> PNG. ``image/jpg`` is read as ``image/jpeg``. Raises
    :class:`ImageError` ``not_acceptable`` (406) when none of PNG, JPEG or WebP is acceptable.
    """
    if accept is None or not accept.strip():
        return "png"
    best: dict[str, tuple[int, float]] = {}  # media type -> (specificity, q)
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        rng = fields[0].lower()
        if not rng:
            continue
        if rng == "image/jpg":
            rng = "image/jpeg"
        q = 1.0
        for f in fields[1:]:
            k, _, v = f.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = min(max(float(v), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        for mt in _ORDER:
            if rng == mt:
                spec = 2
            elif rng == "image/*":
                spec = 1
            elif rng == "*/*":
                spec = 0
            else:
                continue
            if mt not in best or spec > best[mt][0]:
                best[mt] = (spec, q)
    choices = [(q, -_ORDER.index(mt), mt) for mt, (_, q) in best.items() if q > 0]
    if not choices:
        raise ImageError(
            "not_acceptable", f"cannot answer with {accept!r}; this route returns image/png, image/jpeg or image/webp",
            406,
        )
    return OUTPUT_TYPES[max(choices)[2]]
