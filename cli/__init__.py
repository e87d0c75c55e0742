"""The fedrisk command: parser, dispatch, and one subcommand family per module."""
