"""Marks this deep_ep package as epcomm's compatibility package (so that two copies of it on sys.path,
an installed one and a source tree, are not mistaken for a real DeepEP)."""
