"""The one error type the CLI turns into a single clear line and a non-zero exit."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's are pages long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class ExportError(Exception):
    """A user-facing failure: bad config, checkpoint, frame, unsupported op, failed parity."""

    exit_code = 2


class ValidationFailed(ExportError):
    """The exported graph does not match the eager model."""

    exit_code = 1
