"""A model seen through canonical names (:mod:`.names`, :mod:`.view`), load planning and
the load report (:mod:`.plan`), and host buffers (:mod:`.buffers`)."""
