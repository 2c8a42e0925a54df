"""Errors a user can act on: the CLI prints one line and exits with code 2."""


class UsageError(Exception):
    """Bad input from the user (missing image, bad model dir, unknown choice)."""


class VariantUnsupported(Exception):
    """This variant cannot run here (device, kernel capture): a skipped row with the reason."""
