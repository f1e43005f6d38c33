import logging

logging.getLogger("dcp_universal").setLevel(logging.WARNING)
