"""Face detection: RetinaFace, its weights, and the batched detector the faces stage runs."""
