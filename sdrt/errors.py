"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SdrtError(Exception):
    """A problem the user can fix: the message names the option, the value and what is accepted."""
