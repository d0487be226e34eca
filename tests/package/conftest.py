"""Package-wide tests: the layout (which room imports which), settings, security, retries, the
model catalogue, the tier markers."""
