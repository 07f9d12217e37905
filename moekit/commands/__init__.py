"""One module per `moekit` subcommand; see `moekit.cli.COMMANDS`."""
