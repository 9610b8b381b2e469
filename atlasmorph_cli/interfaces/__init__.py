"""nipype interfaces (one node per atlasmorph command) and a ready cohort workflow."""
