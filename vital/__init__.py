"""VITAL: feature visualisation by aligning feature distributions with real images."""
