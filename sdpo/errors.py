"""The one exception type for bad user input, and how entry points report it."""

import functools
import sys


class InputError(ValueError):
    """Bad input from the user (a missing column, a value out of range, an unusable file).

    Entry points print its message on one line and exit with status 2, without a traceback.
    """


def reports_input_errors(main):
    """Decorate an entry point: an InputError becomes `error: ...` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
