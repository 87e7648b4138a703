"""Build-time code: torch -> ONNX exporters and the tiny test models. Needs the [export] extra."""
