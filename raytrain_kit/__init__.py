"""raytrain-kit."""
