"""``save_model`` (:mod:`.save`) and ``load_model`` (:mod:`.load`): one model
directory, any configuration."""
