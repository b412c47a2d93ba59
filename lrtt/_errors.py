"""``lrtt.Error``: the base of every error lrtt raises on purpose.

Each concrete error also keeps the builtin base callers already catch (``ValueError`` for bad
input, ``OSError`` for the filesystem, ``FloatingPointError`` for divergence), so
``except lrtt.Error`` catches whatever lrtt refused and ``except ValueError`` still works:

    >>> import lrtt
    >>> issubclass(lrtt.CheckpointCorruptError, lrtt.Error), issubclass(lrtt.CheckpointCorruptError, ValueError)
    (True, True)
"""


class Error(Exception):
    """An error lrtt raised on purpose: its message names the problem and the fix; its
    attributes (where a subclass documents them) carry the facts, for code to read."""
