"""ImageNet preprocessing (SPEC section 5): see preprocessing/README.md.

Other code uses alexnet_lib.images.load_image_256 to decode an image as the batches hold it.
"""
