"""The pipeline's stages, one module or small package each; no stage imports another."""
