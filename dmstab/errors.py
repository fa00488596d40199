"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class DmstabError(Exception):
    """Bad input from the user (recipe, override, path, checkpoint); never a bug in dmstab."""
