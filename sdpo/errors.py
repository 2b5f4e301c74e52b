"""The one exception type for bad user input."""


class InputError(ValueError):
    """Bad input from the user (a missing column, a value out of range, an unusable file).

    Entry points print its message on one line and exit with status 2, without a traceback.
    """
