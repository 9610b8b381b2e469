"""AtlasMorph: conditional deformable templates of the brain, registration and atlas segmentation."""

__version__ = "0.1.0"
