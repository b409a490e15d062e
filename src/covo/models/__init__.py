"""Models of the project's own: loaders and the weights they ship (the toy reasoner)."""
