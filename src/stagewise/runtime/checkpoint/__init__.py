"""Checkpoints: ``state`` saves and loads training state with torch.distributed.checkpoint
(keyed by model layer, so any layout resumes any other); ``folders`` the folder layout and the
completion protocol (no torch)."""
