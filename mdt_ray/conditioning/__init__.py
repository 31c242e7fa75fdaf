"""Image conditioning as TRELLIS does it: the view crop, the stored view bytes, the frozen DINOv2.

- `preprocess_view(image)`: TRELLIS's crop / Lanczos resize / premultiply of a rendered RGBA view.
- `ImageEncoder.from_checkpoint(path, arch)`: DINOv2 with registers, its layer-normed x_prenorm.
- `ViewConditioner`: on a training worker, draws one stored view per sample from the step's
  generator and encodes it, turning a batch's `views` into its `cond`.
"""

from mdt_ray.conditioning.encoder import ARCHS, EncoderError, ImageEncoder, flops_per_image
from mdt_ray.conditioning.views import (FORMATS, IMAGE_SIZE, ViewError, decode_view, encode_view, preprocess_view,
                                        view_pixels)
from mdt_ray.conditioning.worker import VIEW_STREAM, ViewConditioner, draw_views, images_of

__all__ = ["ARCHS", "FORMATS", "IMAGE_SIZE", "VIEW_STREAM", "EncoderError", "ImageEncoder", "ViewConditioner",
           "ViewError", "decode_view", "draw_views", "encode_view", "flops_per_image", "images_of",
           "preprocess_view", "view_pixels"]
