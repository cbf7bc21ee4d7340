"""The one base class for problems with the user's input, which the CLI reports in one line."""


class UserError(Exception):
    """An expected problem (bad config, malformed url list, busy port): message, not traceback."""
