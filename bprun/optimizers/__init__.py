"""Optimizers beyond torch.optim's first-order ones, named by `conf/optim` nodes.

    kfac      Kronecker-factored natural gradient (bprun's own, on autograd hooks)
    muon      torch.optim.Muon for hidden matrices, AdamW for the rest
    library   SOAP and schedule-free AdamW (pytorch-optimizer), Shampoo (heavyball): `bprun[optim]`

A builder that takes a `model` argument is given the model (K-FAC hooks its
layers, Muon tells hidden matrices from embeddings and heads).
"""
