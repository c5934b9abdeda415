"""Many lines, one model: the bundle as a Triton model, its client backend, protoad-serve."""
