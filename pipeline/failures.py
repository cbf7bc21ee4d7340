"""Failure reasons: img2dataset's free-text error messages mapped to a small, stable vocabulary.

Each failed row keeps its raw ``error_message``; stats and cards count rows by these reasons so that
"404", "timeout" or "truncated image" add up across shards and runs.
"""

import re

UNSUPPORTED_SCHEME = "unsupported_scheme"
EMPTY_URL = "empty_url"
INVALID_URL = "invalid_url"
DEADLINE_EXCEEDED = "deadline_exceeded"

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (reason, re.compile(pattern, re.IGNORECASE))
    for reason, pattern in (
        (UNSUPPORTED_SCHEME, r"^unsupported url scheme"),
        # urllib's own refusal of a redirect to file:// and the like, before our check sees it
        (UNSUPPORTED_SCHEME, r"Redirection to url .* is not allowed"),
        (EMPTY_URL, r"^empty url"),
        (INVALID_URL, r"^invalid url"),
        (DEADLINE_EXCEEDED, r"^deadline exceeded"),
        ("timeout", r"timed out|timeout"),
        ("http_{0}", r"HTTP Error (\d{3})"),
        ("disallowed_by_robots", r"X-Robots-Tag"),
        ("truncated_image", r"truncated"),
        ("broken_image", r"^broken image"),
        ("decompression_bomb", r"decompression bomb"),
        ("not_an_image", r"cannot identify image|Image decoding error|not an image"),
        ("image_too_small", r"image too small"),
        ("image_too_large", r"image area too large"),
        ("aspect_ratio", r"aspect ratio too large"),
        ("connection_error", r"urlopen error|Connection|Errno|Remote end closed|IncompleteRead"),
    )
)


def failure_reason(error_message: str | None) -> str:
    """The reason for one failed row (``other`` for messages no pattern knows)."""
    text = error_message or ""
    for reason, pattern in _PATTERNS:
        match = pattern.search(text)
        if match:
            return reason.format(*match.groups())
    return "other"
