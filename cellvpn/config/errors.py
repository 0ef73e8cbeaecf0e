"""The one error type of configuration loading."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(Exception):
    """A configuration that cannot be used, with one message per problem.

    Every problem found is collected before raising, so an operator fixes a file in one pass
    instead of one restart per typo. ``str()`` gives the messages one per line.
    """

    def __init__(self, messages: Iterable[str], warnings: Iterable[str] = ()) -> None:
        self.messages: list[str] = list(messages)
        #: Warnings found on the way (unknown keys), so a typo is reported with the errors.
        self.warnings: list[str] = list(warnings)
        super().__init__("\n".join(self.messages))
