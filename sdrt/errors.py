"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SdrtError(Exception):
    """A problem the user can fix: the message names the option, the value and what is accepted."""


def first_line(exc: BaseException) -> str:
    """A library's exception as one line of an error message (some span a page)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
