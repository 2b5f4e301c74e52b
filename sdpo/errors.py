"""The exceptions that end a program with a one-line message, and how entry points report them."""

import argparse
import functools
import sys


class InputError(ValueError):
    """Bad input from the user (a missing column, a value out of range, an unusable file).

    Entry points print its message on one line and exit with status 2, without a traceback.
    """


class RunStopped(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row): one line, exit status 1."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line reports of library errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def reports_input_errors(main):
    """Decorate an entry point: an InputError becomes `error: ...` on stderr and exit status 2, a
    RunStopped `error: ...` and exit status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except RunStopped as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown flag, a value that is not a number, a choice not
    offered) are InputErrors: one `error:` line and exit status 2, like every other bad input."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as users read it: the program's docstring as written, and after each flag's help
    its default, unless the help already says what the default is (or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS)
        if not action.option_strings or nothing or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()
