"""Hand-written CPU kernels, compiled on first use with the system C compiler (dsv3.kernels.cpu)."""
