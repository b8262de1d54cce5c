"""Errors of the IR, each naming where it happened (file:line:col, node or tensor)."""


class IRError(Exception):
    """Base of every error about a graph or its text."""


class ShapeError(IRError):
    """An op's inputs or attributes break its shape/dtype rule."""


class VerifyError(IRError):
    """The verifier found a node breaking a rule; the message names the node and the rule."""


class ParseError(IRError):
    """IR text that does not parse; carries the position and what was expected."""

    def __init__(self, message: str, line: int, column: int, source: str = "<ir>"):
        self.line, self.column, self.source = line, column, source
        self.bare_message = message
        super().__init__(f"{source}:{line}:{column}: {message}")
