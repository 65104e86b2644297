"""ClientApp: registers a site's handlers (client/handlers.py) with Flower.

- ``train``: global adapter in, local epochs, shared adapter tensors out.
- ``evaluate``: validation Dice of the global (and personalised) adapter.
- ``evaluate.final``: test Dice of frozen base, global, personalised adapters.
- ``train.local_only``: a site-only baseline adapter's test Dice.
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from client import handlers
from common.payload import Action

app = ClientApp()
app.train()(handlers.train)
app.evaluate()(handlers.evaluate)
app.evaluate(Action.FINAL)(handlers.evaluate_final)
app.train(Action.LOCAL_ONLY)(handlers.train_local_only)
