"""Compositions of features: zoo pull (shipped recipes, Hub), zoo eval (a serve engine or
transformers) and the demo."""
