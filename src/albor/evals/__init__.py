"""albor.evals."""
