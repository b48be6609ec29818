"""Ahead-of-time export to partitioned ONNX plus a placement manifest (see :func:`export_onnx`)."""

from .exporter import ExportOptions, export_onnx

__all__ = ["ExportOptions", "export_onnx"]
