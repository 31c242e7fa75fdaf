"""Flow transformers (stage 1 dense, stage 2 sparse), named sizes, TRELLIS checkpoint I/O."""

from mdt_ray.models.checkpoint import export_trellis, load_trellis
from mdt_ray.models.modules import count_parameters
from mdt_ray.models.registry import NAMED_CONFIGS, build_model
from mdt_ray.models.slat_flow import SLatFlowModel
from mdt_ray.models.sparse import SparseBatch
from mdt_ray.models.ss_flow import SparseStructureFlowModel

__all__ = [
    "NAMED_CONFIGS",
    "SLatFlowModel",
    "SparseBatch",
    "SparseStructureFlowModel",
    "build_model",
    "count_parameters",
    "export_trellis",
    "load_trellis",
]
