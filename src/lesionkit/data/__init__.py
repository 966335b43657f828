"""Data: from a HAM10000 folder (or an external labelled folder) to batches of tensors.

``metadata`` reads and checks the metadata CSV, ``labels`` external label files, ``clinical`` encodes age, sex and
body site for a model, ``split`` makes the lesion-grouped split, ``images`` opens one picture safely, ``download``
fetches the dataset, ``cache`` keeps decoded images, ``preprocessing`` and ``transforms`` frame them, ``datasets``
feeds them to the network.
"""
