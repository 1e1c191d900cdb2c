"""The base of every mistake a user can make on the command line or in a config: the CLI
prints its message (one line) and exits 2. Standard library only, so catching it costs no
import of Ray or torch."""


class UserError(ValueError):
    """A user's mistake (a config key, a file, a model reference, a question); one line."""
