"""The command line's exit codes (``anomalyd``), in one place for every command module."""

EXIT_OK = 0
#: A runtime failure, including: the daemon's HTTP port did not answer, or answered an error.
EXIT_FAILURE = 1
#: Bad arguments, configuration or models.
EXIT_USAGE = 2
#: The broker could not be reached or refused the connection.
EXIT_BROKER = 3
