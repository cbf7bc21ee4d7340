"""The failure vocabulary every stage writes and every reader counts by.

A row that fails keeps its place in every file with a reason: ``images/`` rows keep img2dataset's
``status`` and raw ``error_message``, later stages store a string in their ``error`` column that
says why (``no image: ...`` from the label stage, ``absent: ...`` from tokenize). Stats and cards
count rows by the small, stable reasons below, so that "404", "timeout" or "truncated image" add
up across shards and runs. Writers and readers share these strings through this module only.
"""

import re

SUCCESS = "success"
"""img2dataset's ``status`` of a row whose image was fetched; any other status is a failure."""
ERROR = "error"
"""The column of ``labels/`` and ``tokens/`` files that says why a row has no payload (null: it has one)."""
NO_IMAGE = "no image"
"""How a label error starts when the row had no usable image (as opposed to a labeler that failed)."""
LABELER_TIMEOUT = "labeler timeout"
"""How a label error starts when the labeler took longer than its time limit on that row alone."""
ABSENT = "absent_upstream"
"""The reason tokens fail when the image or label of that row failed in an earlier stage."""
CURATED = "curated"
"""How the error of a row that curation removed starts, in every later stage's ``error`` column."""

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
        ("file_too_large", r"^file too large"),
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


def no_image(why: str) -> str:
    """The error of a row without a usable image, as the label stage and the rgb tokenizer store it."""
    return f"{NO_IMAGE}: {why}"


def download_failed(error_message: str | None) -> str:
    """The error of a row whose download failed, naming the download's reason."""
    return no_image(f"download failed ({failure_reason(error_message)})")


def label_failure_reason(error: str) -> str:
    """The reason for one failed label row: curation removed it before labelling, no image to
    label, the labeler hung on it (past its time limit), or the labeler failed on it."""
    if is_curated(error):
        return curated_reason(error)
    if error.startswith(NO_IMAGE):
        return "no_image"
    return "labeler_timeout" if error.startswith(LABELER_TIMEOUT) else "labeler_error"


def labeler_timeout(labeler: str, seconds: float) -> str:
    """The error of a row that alone kept ``labeler`` past its time limit."""
    return f"{LABELER_TIMEOUT}: {labeler} took longer than {seconds:g} s on this row alone"


def absent(upstream_error: str | None) -> str:
    """The error of a row without tokens, carrying the upstream error that made it absent."""
    return f"absent: {upstream_error}"


def curated(filter_name: str, duplicate_of: str | None = None) -> str:
    """The error of a row removed by curation's ``filter_name`` (naming the copy kept, for a duplicate)."""
    return f"{CURATED}: removed by {filter_name}" + (f" (duplicate of {duplicate_of})" if duplicate_of else "")


def is_curated(error: str | None) -> bool:
    return bool(error) and error.startswith(f"{CURATED}:")


def curated_reason(error: str) -> str:
    """``curated_<filter>``: the reason summaries and cards count a removed row by."""
    return f"{CURATED}_{error.removeprefix(f'{CURATED}: removed by ').split(' ', 1)[0]}"
