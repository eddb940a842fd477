"""Values that never show themselves in a repr, str, log line or traceback: secrets and URLs with passwords."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["Secret", "SecretURL", "redact_url"]


class Secret:
    """A string that never shows itself in a repr, str, log or traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretURL(Secret):
    """A connection URL whose password is masked when shown."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"SecretURL({redact_url(self._value)!r})"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***', for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
