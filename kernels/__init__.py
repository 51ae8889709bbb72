"""OpenCL C kernels of the datapath (docs/datapath.md); shipped as package data."""
