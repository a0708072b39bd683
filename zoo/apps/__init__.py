"""Compositions of features: zoo pull (shipped recipes, Hub) and the demo."""
