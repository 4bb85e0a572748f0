"""The ``shoprank`` console command: one entry point with a subcommand for each service and tool."""
