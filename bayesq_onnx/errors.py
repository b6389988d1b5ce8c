"""The one exception type that means "the user's input is wrong" (CLI: one line, exit 2)."""
import importlib


class BayesQError(Exception):
    """Bad input or an impossible request; the message is one line meant for the user."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line (library errors often run to many)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def require(module: str, install: str, what: str):
    """Import the optional ``module`` or fail in one line saying ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BayesQError(f"the {what} needs the Python package '{module}' ({install}): {e}") from None
