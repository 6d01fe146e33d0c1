"""The file name extensions the loaders read as images: one list for the sample reader, the supervisor that copies
screened images (`--copy-to`) and the fleet cache that hashes an image folder; torch-free, as those two are."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif"})
