"""One module per ``segfast`` subcommand, each with ``register(subparsers)``.

``segfast.cli.COMMANDS`` lists them in the order ``segfast --help`` shows them.
"""
