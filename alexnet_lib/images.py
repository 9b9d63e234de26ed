"""One image as the batches hold it: 256x256 RGB, uint8, HWC.

    from alexnet_lib.images import load_image_256
    x = load_image_256('ILSVRC2012_img_val/ILSVRC2012_val_00000001.JPEG')  # uint8 (256, 256, 3)

make_hkl.py builds every batch row with this function and classify.py uses it for a single
image, so a picture gives the network the same pixels either way.

What it does, as the original preprocessing: the file's content decides its format, not its
name (ImageNet holds a PNG named .JPEG); greyscale is replicated to three channels; an alpha
channel is dropped (not composited); CMYK and palette images are converted to RGB; 16-bit
greyscale is scaled to 8 bits. The image is resized to exactly 256x256 (aspect ratio not kept)
with PIL's antialiased bilinear filter, the filter of the original pipeline (scipy.misc.imresize).
EXIF orientation and ICC profiles are ignored, as the original did.

Speed: a JPEG is decoded by libjpeg at a reduced scale (1/2, 1/4 or 1/8) when the reduced image
is still at least 256 pixels on both sides (PIL's Image.draft), which makes large photographs
several times cheaper to decode.

A file that cannot be decoded completely (truncated, corrupt, not an image) raises
ImageDecodeError naming the file; it never gives a partial or black image.

Which files are images, by name (preprocessing lists a folder with it): IMAGE_SUFFIXES, the
formats PIL reads that photographs come in, compared in lower case; is_image_name(name).
"""
import numpy as np
from PIL import Image

from alexnet_lib.errors import UserError

SIZE = 256
RESAMPLE = Image.Resampling.BILINEAR

_GREY_16BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')

# The names of image files: every format of PIL's that pictures come in (ImageNet's are .JPEG,
# others' .jpg, .png, .bmp, .webp, ...), compared in lower case. The content still decides the
# format when the file is read.
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.jpe', '.jfif', '.png', '.bmp', '.dib', '.webp', '.gif',
                  '.tif', '.tiff', '.ppm', '.pgm', '.pbm', '.pnm')


class ImageDecodeError(UserError):
    """An image file could not be read completely; the message names the file."""


def _to_rgb_or_grey(img):
    """The decoded image as mode 'RGB' or 'L' (grey is resized before it is replicated)."""
    if img.mode in ('RGB', 'L'):
        img.load()
        return img
    if img.mode in _GREY_16BIT:
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray((grey // 257).astype(np.uint8), 'L')
    if img.mode in ('1', 'LA', 'La', 'F'):
        return img.convert('L')
    return img.convert('RGB')  # RGBA, RGBX, CMYK, P, PA, YCbCr, LAB, HSV, ...


def is_image_name(name):
    """Whether a file name is an image's: one of IMAGE_SUFFIXES, in any case, and not hidden
    (macOS's ._name.JPEG files are not images)."""
    return not name.startswith('.') and name.lower().endswith(IMAGE_SUFFIXES)


def load_image_256(path):
    """The image file at ``path`` as a uint8 array (256, 256, 3), RGB. Raises ImageDecodeError."""
    try:
        with Image.open(path) as img:
            if img.format == 'JPEG':
                img.draft('RGB', (SIZE, SIZE))
            img = _to_rgb_or_grey(img)
            img = img.resize((SIZE, SIZE), RESAMPLE)
            if img.mode != 'RGB':
                img = img.convert('RGB')
            return np.array(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        raise ImageDecodeError(f"cannot read image {path}: {reason}") from None
