"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class AtlasMorphError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
