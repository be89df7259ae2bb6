import base64

import numpy as np
import pytest
from PIL import Image

from vllm_omni_images.images.encoding import decode_image_base64, encode_image_base64


@pytest.fixture
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_png_base64_round_trip_is_lossless(image):
    data = encode_image_base64(image)
    assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    decoded = decode_image_base64(data)
    assert decoded.format == "PNG"
    assert decoded.size == (64, 48)
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_and_quality(image, output_format, pil_format):
    best = encode_image_base64(image, output_format, 100)
    small = encode_image_base64(image, output_format, 10)
    assert decode_image_base64(best).format == pil_format
    assert decode_image_base64(best).size == (64, 48)
    assert len(small) < len(best)
