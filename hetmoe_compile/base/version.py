"""The package version, and the producer string every written artefact carries (placements, results, ONNX)."""

__version__ = "0.1.0"
PRODUCER = f"hetmoe-compile {__version__}"
