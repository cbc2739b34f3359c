"""The network, the losses, code packing, transforms and metrics: pure torch/numpy, no Ray."""
