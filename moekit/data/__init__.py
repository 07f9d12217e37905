"""Datasets and feature specs. Loaders take a path, or look under $MOEKIT_DATA."""
