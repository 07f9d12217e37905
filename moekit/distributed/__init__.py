"""moekit.distributed."""
