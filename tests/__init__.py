"""fedshift.tests."""
