"""Model families, one per file."""
