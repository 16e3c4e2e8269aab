"""Neuron labels (CLIP-Dissect, Oikarinen & Weng 2022): probe activations (``probe``), concept
sets and concept matrices (``concepts``), neuron-concept similarities (``similarity``), and the
whole-layer run with its outputs (``describe``; script ``describe_neurons.py``)."""
