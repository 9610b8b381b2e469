"""Geometry: the model grid and resampling, affine registration, intensity normalisation, transforms."""
