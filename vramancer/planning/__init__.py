"""Where each part of a model goes and what that costs: placement, memory model, pricing. No torch."""
