"""What the console tells a person when it cannot show a page: a sentence, never a stack trace."""

from __future__ import annotations


class ConsoleError(Exception):
    """Bad input or an unavailable dependency, said plainly; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
