"""Export models for deployment without PyTorch: ONNX encoder + decoder (see `export_onnx`)."""

from samkit.export.onnx_export import SPEC_NAME, export_onnx, quantize_int8

__all__ = ["SPEC_NAME", "export_onnx", "quantize_int8"]
