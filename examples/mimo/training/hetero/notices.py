"""Library warnings that tell the user nothing, counted instead of printed.

megatron-core and torch announce experimental APIs, missing optional packages they fall back
from (transformer-engine and apex on a CPU), and deprecations inside their own code, once per
import and rank: about twenty lines before the first iteration, none of which the user can act
on. ``Notices.install`` keeps them off stderr and counts them; rank 0 says how many at the end,
and ``--verbose-warnings`` shows each once instead. A warning not on the list below, or a deprecation
reported at a line of this package, is always shown (once per job).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import warnings
from typing import Optional

PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (category, a piece of the message) of notices with nothing to act on; "" matches any message
NOTICES = (
    (UserWarning, "is experimental"),
    (UserWarning, "are not installed"),
    (UserWarning, "is not installed"),
    (UserWarning, "full scope is deprecated"),
    (UserWarning, "'pin_memory' argument is set as true but no accelerator"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor"),
    (DeprecationWarning, ""),
    (FutureWarning, ""),
)
# megatron-core's logger lines of the same kind
LOG_NOTICES = ("full_param_layout not provided", "async save is deprecated")


def is_notice(category: type, message: str, filename: str) -> bool:
    """A library notice. A deprecation reported at a line of this package is our own use of a
    deprecated API: shown. (The named notices are the library's wherever its stack level points,
    e.g. MimoModel's experimental-API notice at our call.)"""
    ours = os.path.abspath(filename).startswith(PACKAGE + os.sep)
    return any(issubclass(category, kind) and piece in message and not (ours and not piece)
               for kind, piece in NOTICES)


class Notices(logging.Handler):
    """Installed once per process; as a logging handler it takes megatron-core's records (which
    then no longer propagate to the root logger's handlers) and prints those that matter."""

    def __init__(self, *, show: bool, verbose: bool):
        super().__init__()
        self.show, self.verbose = show, verbose
        self.hidden: collections.Counter = collections.Counter()
        self._print = warnings.showwarning

    def install(self) -> "Notices":
        # "once": each warning once per process (torch and megatron-core repeat them per call)
        warnings.simplefilter("once" if self.show else "ignore")
        warnings.showwarning = self._showwarning
        # megatron-core logs INFO/WARNING per rank through its own loggers (bucket layouts, ...)
        megatron = logging.getLogger("megatron")
        megatron.setLevel(logging.WARNING if self.show else logging.ERROR)
        megatron.propagate = False
        megatron.addHandler(self)
        return self

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        if not self.verbose and is_notice(category, str(message), filename):
            self.hidden[f"{category.__name__}: {str(message).splitlines()[0][:100]}"] += 1
            return
        self._print(message, category, filename, lineno, file, line)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not self.verbose and any(p in message for p in LOG_NOTICES):
            self.hidden[f"{record.name}: {message[:100]}"] += 1
            return
        print(f"{record.levelname}:{record.name}:{message}", file=sys.stderr, flush=True)

    def summary(self) -> Optional[str]:
        if not self.hidden:
            return None
        return (f"{sum(self.hidden.values())} library notices not shown ({len(self.hidden)} "
                f"kinds: experimental-API notices, fallbacks from packages not installed, "
                f"deprecations inside torch and megatron-core); --verbose-warnings shows them")
