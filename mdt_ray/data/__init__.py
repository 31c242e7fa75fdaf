"""The distillation corpus: schema and manifest, the synthetic and TRELLIS writers, storage access
(local and s3://), and the Ray Data pipeline that feeds training workers.

Submodules import pyarrow, numpy and (for the pipeline) Ray lazily on use; import what you need:
`mdt_ray.data.schema`, `.synthetic`, `.corpus`, `.trellis_import`, `.storage`, `.pipeline`.
"""
