"""Model families cut into pipeline layers: the tiny GPT, Hugging Face models, your own module.

Each family builds :class:`~stagewise.runtime.models.model_parts.ModelParts` (layers, loss, data,
tied weights, and its tensor-parallel plan); ``resolve.resolve_model`` picks one by its spec.
"""
