"""fedshift.server."""
