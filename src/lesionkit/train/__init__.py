"""Training: the phase loop (``loop``), the data a run trains on (``prepare``), its callbacks, exact resuming,
and the run folder."""
