"""The export stage: a trained checkpoint (or an in-memory model) -> one self-contained,
checksummed, verified bundle that :mod:`moe_rec.serve` loads without DeepSpeed."""

from moe_rec.export.bundle import Bundle, BundleError, export_checkpoint, export_model, load_bundle

__all__ = ["Bundle", "BundleError", "export_checkpoint", "export_model", "load_bundle"]
