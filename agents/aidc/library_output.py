"""Keep what libraries print off the user's terminal and in a log file.

torch's c10d writes its warnings ("[W... socket.cpp] [c10d] ... timed out") from C++ straight
to file descriptor 2, where no Python setting reaches them; Python warnings and torch's loggers
without a handler also end on stderr. Inside `library_output_to(log)`, descriptor 2 is the log
file, Python warnings and the `torch` loggers write there too, and `sys.stderr` (this program's
own messages: progress, errors) is a copy of the terminal's descriptor, so they still reach the
user. Processes started inside inherit descriptor 2: their stray output goes to the log too."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from aidc.files import FILE_MODE, open_nofollow

LIBRARY_LOGGERS = ("torch",)


@contextlib.contextmanager
def library_output_to(log_path: str | os.PathLike):
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = open_nofollow(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    own = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                    errors="backslashreplace")
    log = os.fdopen(os.dup(log_fd), "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    os.dup2(log_fd, 2)
    os.close(log_fd)
    saved_stderr = sys.stderr
    sys.stderr = own
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = {name: logging.getLogger(name) for name in LIBRARY_LOGGERS}
    propagate = {name: lg.propagate for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            yield log_path
    finally:
        for name, lg in loggers.items():
            lg.removeHandler(handler)
            lg.propagate = propagate[name]
        own.flush()
        log.flush()
        sys.stderr = saved_stderr
        os.dup2(terminal, 2)
        os.close(terminal)
        own.close()
        log.close()
