"""What the files say, with no I/O: the typed manifest and the step layout's names
(:mod:`.manifest`), and torch's private formats (:mod:`.torch_formats`)."""
