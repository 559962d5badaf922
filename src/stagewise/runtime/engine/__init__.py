"""The engine: one interpreter runs any validated schedule on torch.distributed ranks.

``lowering`` adds the sends and receives the placement implies, ``pipeline`` executes a rank's
actions (F, B, and split I/W), ``p2p`` moves tensors between ranks, ``failure`` stops every
rank at the first error, ``measure`` turns the recorded actions into a ``Timeline``,
``partition`` cuts layers into stages and ``launch`` starts local ranks (or joins torchrun).
"""
