"""The one exception type that carries a message meant for the user."""


class MedmtlError(Exception):
    """Bad input or configuration, described for a user.

    The message names the file, series or setting at fault and what is wrong with it. The command line
    prints it as one line and exits non-zero; batch jobs record it and carry on with the other inputs.
    """
