"""Inference: template, registration and segmentation of one subject, refinement, brain extraction, quality, QC."""
