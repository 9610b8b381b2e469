"""Volume files: NIfTI/.mgz reading and atomic writing, frame-by-frame 4D writing, the data folder."""
