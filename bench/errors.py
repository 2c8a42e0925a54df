"""Errors a user can act on: the CLI prints one line and exits with code 2."""
import argparse


class UsageError(Exception):
    """Bad input from the user (missing image, bad model dir, unknown choice)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a value of the wrong type) are one line on
    stderr and exit code 2, as every other usage error, instead of the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class VariantUnsupported(Exception):
    """This variant cannot run here (device, kernel capture): a skipped row with the reason."""
