"""albor.train."""
