"""The OpenCL backend of the HAL (Step 6; the kernels' host side is its first piece)."""
