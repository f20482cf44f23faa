"""The one exception type a user sees: its message is a single sentence meant for them."""


class VramancerError(Exception):
    """Bad input or an operation refused. The CLI prints it on stderr and exits 2; the
    dashboard shows it as a notification. The message is one complete sentence."""
