"""User-facing errors: the CLI prints their message on one line and exits with code 2 (bad input)
or 1 (children of a sweep that failed elsewhere)."""


class DmstabError(Exception):
    """Bad input from the user (recipe, override, path, checkpoint); never a bug in dmstab."""


class ChildrenFailed(RuntimeError):
    """Children of a sweep that failed or were killed in their own jobs, the others having run to
    their end: one line naming each and its log. Not the user's input: the CLI exits 1."""
