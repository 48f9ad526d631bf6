"""Helpers shared by several stages (the data bundle, training parameters, batched logits, deploy-time inputs).

Not stages themselves: discovery (:func:`stages.load_stages`) imports only the modules beside it.
A stage imports these, never another stage.
"""
