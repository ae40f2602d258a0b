"""The command line's exit codes (``anomalyd``), in one place for every command module."""

EXIT_OK = 0
#: A runtime failure, including: the daemon's HTTP port did not answer, or answered an error.
EXIT_FAILURE = 1
#: Bad arguments, configuration or models.
EXIT_USAGE = 2
#: The broker could not be reached, or refused the connection for a while (busy, starting).
EXIT_BROKER = 3
#: The broker refused these credentials, this client id or certificate, or gives QoS 0
#: only: starting again as configured cannot help (the systemd unit does not restart it).
EXIT_REFUSED = 4
