"""The command line's commands, one module each with ``add_arguments(parser)`` and ``run(args)``; the table that
names them is ``lesionkit.cli.COMMANDS``."""
