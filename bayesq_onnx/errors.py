"""The one exception type that means "the user's input is wrong" (CLI: one line, exit 2)."""


class BayesQError(Exception):
    """Bad input or an impossible request; the message is one line meant for the user."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line (library errors often run to many)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
