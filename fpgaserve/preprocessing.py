"""ImageNet preprocessing in TensorFlow: encoded images -> 224x224 float tensors.

Decode (JPEG/PNG), resize with the aspect ratio kept so the shorter side is 256, centre-crop
224x224, then the zoo model's normalisation (keras.applications.imagenet_utils modes).
"""

from __future__ import annotations

import tensorflow as tf
from keras.applications import imagenet_utils

RESIZE_SHORTER = 256
CROP = 224


def decode_and_crop(
    encoded: tf.Tensor, shorter: int = RESIZE_SHORTER, crop: int = CROP
) -> tf.Tensor:
    """One encoded image (scalar string) -> crop x crop x 3 float32 in [0, 255], RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    scale = tf.cast(shorter, tf.float32) / tf.minimum(height, width)
    size = tf.cast(tf.round(tf.stack([height * scale, width * scale])), tf.int32)
    resized = tf.image.resize(image, tf.maximum(size, crop), method="bilinear", antialias=True)
    top = (tf.shape(resized)[0] - crop) // 2
    left = (tf.shape(resized)[1] - crop) // 2
    return resized[top : top + crop, left : left + crop, :]


def preprocess(images: list[bytes], mode: str) -> tf.Tensor:
    """A batch of encoded images -> (N, 224, 224, 3) float32 normalised for ``mode``."""
    batch = tf.stack([decode_and_crop(tf.constant(data)) for data in images])
    return imagenet_utils.preprocess_input(batch, mode=mode)
