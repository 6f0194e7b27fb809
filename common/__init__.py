"""fedshift.common."""
