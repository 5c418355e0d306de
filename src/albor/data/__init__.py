"""albor.data."""
