"""A real S3 endpoint for tests and the demo: moto's server on 127.0.0.1, nothing else."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid


@contextlib.contextmanager
def moto_s3(bucket: str = "ckpt"):
    """Start moto's S3 server on a free loopback port; yield ``(root_url, storage_options)``."""
    from moto.server import ThreadedMotoServer

    # never reach a real account, whatever the environment holds
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ[key] = value
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    try:
        import boto3

        boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     ).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}", options
    finally:
        server.stop()


def fresh_prefix(root: str) -> str:
    return f"{root}/{uuid.uuid4().hex[:8]}"
