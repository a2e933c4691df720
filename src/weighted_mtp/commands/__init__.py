"""One module per `wmtp` subcommand: argument parsing and a `run(args)` that calls library code."""
