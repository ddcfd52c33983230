"""laionface: build, audit and publish face image-text datasets like LAION-FACE, on Dask."""

import os

# img2dataset imports albumentations, which otherwise checks PyPI for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
