"""ONNX export with the front end inside, FP16 / INT8, TensorRT engines and bundles."""
