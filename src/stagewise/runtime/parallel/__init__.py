"""Parallelism around the pipeline: the device mesh (data parallelism, FSDP) and tensor
parallelism. Model-agnostic: a model family supplies its own tensor-parallel plan."""
