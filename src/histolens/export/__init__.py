"""Exporting a checkpoint to ONNX (fp32 or int8) and verifying the export.

Owns ``onnx`` (``export_onnx``), ``quantize`` (int8) and ``verify`` (comparison with torch).
May import: everything below it (base .. training).
"""
