"""fedshift.client."""
