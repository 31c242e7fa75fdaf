"""The defaults of `mdt-ray corpus import-trellis`, in a module of their own so that the command's
`--help` shows them without importing pyarrow, numpy and the importer."""

DEFAULT_SS_MODEL = "ss_enc_conv3d_16l8_fp16"
DEFAULT_SLAT_MODEL = "dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16"
DEFAULT_COND_DIR = "cond_tokens"
RENDERS_DIR = "renders_cond"
# The stored views per asset and their encoding: the trade-off measured in docs/scaling.md.
DEFAULT_VIEWS = 8
DEFAULT_IMAGE_FORMAT = "webp-lossless"
DEFAULT_IMAGE_QUALITY = 95
MAX_VOXELS = 32768  # TRELLIS's max_num_voxels (both SLAT configs)
MIN_AESTHETIC = 4.5  # both MDT-dist configs
