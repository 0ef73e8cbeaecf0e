"""The server's live sessions, by session id. Plain Python: no reactor."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class SessionRegistry(Generic[T]):
    """Session ids are random non-zero u32 values, unique among live sessions."""

    def __init__(self) -> None:
        self._by_id: dict[int, T] = {}

    def new_id(self) -> int:
        while True:
            sid = secrets.randbits(32)
            if sid and sid not in self._by_id:
                return sid

    def add(self, session_id: int, session: T) -> None:
        if session_id in self._by_id:
            raise KeyError(f"session id {session_id:#010x} is already live")
        self._by_id[session_id] = session

    def remove(self, session_id: int) -> T | None:
        return self._by_id.pop(session_id, None)

    def get(self, session_id: int) -> T | None:
        return self._by_id.get(session_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._by_id.values()))
