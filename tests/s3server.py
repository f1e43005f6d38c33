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


class Counting:
    """Bytes and requests fetched from S3, by object: every ranged read and whole-object
    read that s3fs makes, patched in this process only through ``setattr`` (pytest's
    ``monkeypatch.setattr`` in a test, the builtin in a spawned rank or a benchmark)."""

    def __init__(self, setattr=setattr) -> None:
        import s3fs

        self.fetched: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        fetch_range, cat_file = s3fs.core.S3File._fetch_range, s3fs.core.S3FileSystem._cat_file

        def counted_range(f, start, end):
            out = fetch_range(f, start, end)
            self._add(f.path, len(out))
            return out

        async def counted_cat(fs, path, version_id=None, start=None, end=None):
            out = await cat_file(fs, path, version_id=version_id, start=start, end=end)
            self._add(path, len(out))
            return out

        setattr(s3fs.core.S3File, "_fetch_range", counted_range)
        setattr(s3fs.core.S3FileSystem, "_cat_file", counted_cat)

    def _add(self, path: str, n: int) -> None:
        key = path.split("://", 1)[-1]
        self.fetched[key] = self.fetched.get(key, 0) + n
        self.requests[key] = self.requests.get(key, 0) + 1

    def total(self) -> int:
        return sum(self.fetched.values())

    def data(self) -> int:
        """Bytes of DCP data files (``.distcp``), leaving metadata and manifests out."""
        return sum(n for key, n in self.fetched.items() if key.endswith(".distcp"))

    def data_requests(self) -> int:
        return sum(n for key, n in self.requests.items() if key.endswith(".distcp"))

    def reset(self) -> None:
        self.fetched.clear()
        self.requests.clear()
