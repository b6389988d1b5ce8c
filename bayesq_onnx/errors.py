"""The one exception type that means "the user's input is wrong" (CLI: one line, exit 2)."""


class BayesQError(Exception):
    """Bad input or an impossible request; the message is one line meant for the user."""
