import logging

logging.getLogger("dcp_universal").setLevel(logging.WARNING)

import pytest


@pytest.fixture(scope="session")
def s3():
    """``(root_url, storage_options)`` of a moto S3 server on 127.0.0.1 for the session."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from s3server import moto_s3

    with moto_s3() as server:
        yield server
