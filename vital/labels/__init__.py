"""Neuron labels (CLIP-Dissect): probe activations, concept matrices, similarities."""
