"""Exporting a checkpoint to ONNX (fp32 or int8) and verifying the export.

Owns ``onnx`` (``export_onnx``), ``quantize`` (int8), ``verify`` (fp32: comparison with torch)
and ``guard`` (int8: comparison with fp32 on unseen patients).
May import: everything below it (base .. training).
"""
