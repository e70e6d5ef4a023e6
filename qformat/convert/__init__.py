"""The conversion pipeline: load a model, calibrate, quantize block by block, write the format."""
