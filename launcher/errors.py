"""Errors and exit codes shared by every command (the bottom of `launcher/`).

`ConfigError` is defined in parallel/errors.py (so the pure `parallel/` layer can raise it
without importing `launcher/`) and is the same class here.
"""

from __future__ import annotations

from parallel.errors import ConfigError, one_line, show_value

__all__ = ["ConfigError", "one_line", "show_value", "EXIT_OK", "EXIT_FAILURE", "CONFIG_ERROR_EXIT_CODE",
           "EXIT_REQUEUE"]

# Exit codes of `python -m launcher.train` (docs/CHECKPOINTS.md): 0 only when training reached
# its last step; 1 an unexpected failure (worth a retry); 2 a configuration or usage error
# (never worth a retry); 75 a checkpoint was saved after SIGTERM/SIGUSR1: requeue to continue.
EXIT_OK = 0
EXIT_FAILURE = 1
CONFIG_ERROR_EXIT_CODE = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, try again later"
