"""albor.track."""
