"""moekit.rl."""
