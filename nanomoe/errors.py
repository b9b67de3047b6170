"""The one exception a person running a script sees as a message instead of a traceback."""


class UserError(Exception):
    """Bad input from the person running a script. Printed as one 'error: ...' line, exit code 2 (cli.run_cli)."""
