"""One registry shape for everything users extend by name: losses, advantage estimators, rewards,
judges, benchmark loaders and attack transforms.

    LOSSES = Registry("loss", decorator="register_loss")

    @LOSSES.register("grpo")
    def grpo(...): ...

    LOSSES.get("grpo")     # the function; an unknown name is a one-line error listing the known
                           # ones and how to add one
    LOSSES.names()         # sorted names

Registering a second, different object under a taken name is an error; registering the same
object again (or a reloaded module's version of it) replaces it.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


def _origin(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


class Registry(Generic[T]):
    """Named objects of one kind.

    Args:
      kind: what the entries are, for messages ("loss", "advantage estimator", "benchmark").
      decorator: the public decorator's name, shown in the "add one with @..." hint.
      listed: how the known names are introduced in the unknown-name error ("available").
      error: the exception class of an unknown name (a ValueError subclass).
      hint: the fix shown after the list (default: ``add one with @<decorator>``).
    """

    def __init__(self, kind: str, *, decorator: str, listed: str = "available",
                 error: type[Exception] = ValueError, hint: str = ""):
        self.kind = kind
        self.decorator = decorator
        self.listed = listed
        self.error = error
        self.hint = hint or f"add one with @{decorator}"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a callable under `name`."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.decorator}: the name must be a non-empty string, got {name!r}")

        def deco(obj: T) -> T:
            if not callable(obj):
                raise TypeError(f"{self.decorator}({name!r}) expects a callable, got {type(obj).__name__}")
            existing = self._entries.get(name)
            if existing is not None and existing is not obj and _origin(existing) != _origin(obj):
                raise ValueError(f"{self.decorator}: {self.kind} {name!r} is already registered "
                                 f"(by {_origin(existing)}); pick another name")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry registered as `name`; an unknown name is a one-line error naming the fix."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r}; {self.listed}: {', '.join(self.names()) or 'none'} "
                             f"({self.hint})") from None

    def unregister(self, name: str) -> None:
        """Remove `name` (a test's own entries, say); an unknown name is the same error as `get`."""
        self.get(name)
        del self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries
