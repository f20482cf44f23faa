"""The one exception type a user sees: its message is a single sentence meant for them."""


class VramancerError(Exception):
    """Bad input or an operation refused. The CLI prints it on stderr and exits 2; the
    dashboard shows it as a notification. The message is one complete sentence."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's message (its tracebacks and hints stay out of ours)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def as_sentence(text: str) -> str:
    """A library's message, quoted at the end of ours, still closes our sentence."""
    return text if text.endswith((".", "?", "!")) else text + "."
