"""fedshift.simulations."""
