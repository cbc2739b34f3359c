"""The network, the losses and code packing: pure torch/numpy, no Ray."""
