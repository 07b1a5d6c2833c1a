"""bprun: train neural networks by backpropagation from the command line."""

__version__ = "0.1.0"
