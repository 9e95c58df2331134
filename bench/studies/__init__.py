"""Studies of why a rule behaves as it does, beyond what its runs record."""
