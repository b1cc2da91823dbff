"""Training of draft models (the LongSpec draft layer) against a frozen lsrt target."""
