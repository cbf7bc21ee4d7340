import pytest

from four_m.core.failures import failure_reason


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("unsupported url scheme 'file' (allowed: http, https)", "unsupported_scheme"),
        (
            "unsupported url scheme 'ftp' (allowed: http, https), redirected from http://a.example/x.jpg",
            "unsupported_scheme",
        ),
        ("HTTP Error 302: Found - Redirection to url 'file:///etc/hostname' is not allowed", "unsupported_scheme"),
        ("deadline exceeded: 10 s", "deadline_exceeded"),
        ("empty url", "empty_url"),
        ("invalid url: no host", "invalid_url"),
        ("aspect ratio too large: 4000x2 resizes to 64 by 128000 px", "aspect_ratio"),
        ("broken image: image file is truncated (3 bytes not processed)", "truncated_image"),
        ("not an image: cannot identify image file", "not_an_image"),
        ("decompression bomb: 9000x9000 pixels > limit 100", "decompression_bomb"),
        ("file too large: more than 67108864 bytes", "file_too_large"),
        ("Use of image disallowed by X-Robots-Tag directive", "disallowed_by_robots"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_messages_map_to_reasons(message, reason):
    assert failure_reason(message) == reason
