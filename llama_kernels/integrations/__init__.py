"""Drop-in use of llama-kernels inside other codebases."""
