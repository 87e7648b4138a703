"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

import re


class SdrtError(Exception):
    """A problem the user can fix: the message names the option, the value and what is accepted."""


def first_line(exc: BaseException) -> str:
    """A library's exception as one line of an error message (some span a page)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def as_field(exc: SdrtError) -> str:
    """sdrt's errors name command-line options (`--mask-blur 3`); a request or a batch line names fields (`mask_blur`)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), str(exc))
