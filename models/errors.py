"""The one exception type that means "the user asked for something we cannot do"."""


class HashrayError(ValueError):
    """A problem with the user's input or configuration.

    The CLI prints its message as one line and exits with code 2, so the message
    must say what was wrong, where (file/row/field), and what is allowed.
    """
