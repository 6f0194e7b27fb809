"""fedshift.deploy."""
