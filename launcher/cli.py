"""What every command's command line shares: the argument parser whose usage mistakes are one
`config error:` line and exit 2, and the default config file.
"""

from __future__ import annotations

import argparse
import sys

from launcher.config.load import DEFAULT_CONFIG  # noqa: F401  (every verb's --config default)
from launcher.errors import CONFIG_ERROR_EXIT_CODE, ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """A usage mistake is a configuration mistake: one line naming the option, exit 2
    (argparse's own error() prints its usage block first)."""

    def error(self, message: str):
        key, what = _key_and_problem(message, self.prog)
        print(f"config error: {ConfigError(key, what)}", file=sys.stderr)
        self.exit(CONFIG_ERROR_EXIT_CODE)


def _key_and_problem(message: str, prog: str) -> tuple[str, str]:
    """argparse's message as (the option it is about, what is wrong), said once."""
    if message.startswith("unrecognized arguments: "):
        first = message.split(": ", 1)[1].split(" ")[0]  # '' when the argument was an empty string
        return first, f"unknown option ({prog} --help)"
    if message.startswith("the following arguments are required: "):
        return message.split(": ", 1)[1], f"required ({prog} --help)"
    if message.startswith("one of the arguments ") and message.endswith(" is required"):
        options = message.removeprefix("one of the arguments ").removesuffix(" is required").split()
        return " or ".join(options), f"give one of them ({prog} --help)"
    key, _, what = message.removeprefix("argument ").partition(": ")  # "argument --world-size: invalid int value: 'four'"
    return (key, what) if what else ("arguments", message)
