"""Second-order effects of CLIP neurons: effects, components, text decompositions."""
