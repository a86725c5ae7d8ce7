"""The one exception type for mistakes a user can fix (bad config, data, checkpoint...).

The CLI prints its message and exits non-zero without a traceback; library users can catch
it as a ``ValueError``.
"""


class DilemmaError(ValueError):
    """Bad user input: the message says what is wrong and how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise ``DilemmaError(message)`` unless ``condition`` holds: one line per config check."""
    if not condition:
        raise DilemmaError(message)
