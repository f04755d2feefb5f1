"""What every command's command line shares: the argument parser whose usage mistakes are one
`config error:` line and exit 2, and the default config file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ArgumentParser(argparse.ArgumentParser):
    """A usage mistake is a configuration mistake: one line naming the option, exit 2
    (argparse's own error() prints its usage block first)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            key, what = message.split(": ", 1)[1].split()[0], f"unknown option ({self.prog} --help)"
        else:  # "argument --world-size: invalid int value: 'four'"
            key, _, what = message.removeprefix("argument ").partition(": ")
        print(f"config error: {ConfigError(key, what or message)}", file=sys.stderr)
        self.exit(CONFIG_ERROR_EXIT_CODE)
